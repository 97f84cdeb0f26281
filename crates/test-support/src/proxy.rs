//! TCP proxies on loopback: [`LinkCutter`] cuts its link under load, as a network that
//! fails in the middle of a transfer; [`CountingProxy`] counts what it carries and can
//! shape it ([`LinkShape`]), as a slow link from the client to a host.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Forwards connections from a port of its own on 127.0.0.1 to another port there. A
/// connection that has carried more than `after` bytes towards the client (the host's
/// answers: a NAR coming home) is cut, both ways at once, as long as fewer than `times`
/// connections were cut before; later connections pass untouched. Dropping it stops
/// taking connections.
pub struct LinkCutter {
    port: u16,
    cuts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl LinkCutter {
    /// A proxy to 127.0.0.1:`target` that cuts up to `times` connections, each once more
    /// than `after` bytes came back through it.
    pub fn start(target: u16, after: u64, times: usize) -> LinkCutter {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy's port");
        let port = listener.local_addr().expect("the proxy's address").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let cuts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cuts.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let cuts = c.clone();
                        std::thread::spawn(move || forward(client, target, after, times, &cuts));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        LinkCutter {
            port,
            cuts,
            stop,
            accept: Some(accept),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How many connections it cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for LinkCutter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Carries one connection both ways until either side ends it or it is cut.
fn forward(client: TcpStream, target: u16, after: u64, times: usize, cuts: &AtomicUsize) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Client to server, until either side closes.
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
        let _ = server_out.shutdown(Shutdown::Write);
    });
    // Server to client, counted; cut once past `after` while cuts remain.
    let (mut from, mut to) = (&server, &client);
    let mut carried = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        carried += n as u64;
        if carried > after
            && cuts
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    (c < times).then_some(c + 1)
                })
                .is_ok()
        {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    let _ = up.join();
}

/// The shape of a link in one direction and the other alike: a serializer of `rate`
/// bytes a second shared by every connection through the link (chunks queue behind
/// each other in the order they were read), then `delay` of one-way propagation, as
/// `scripts/shape-link.py` models it. The default passes bytes at loopback speed.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkShape {
    /// Bytes a second each way, shared by all connections; None: no limit.
    pub rate: Option<u64>,
    /// One-way delay each way.
    pub delay: Duration,
}

impl LinkShape {
    fn is_shaped(self) -> bool {
        self.rate.is_some() || !self.delay.is_zero()
    }
}

/// One direction of a [`CountingProxy`]'s link: its serializer and what it carried.
struct Direction {
    shape: LinkShape,
    /// When the serializer is free again.
    busy_until: Mutex<Instant>,
    bytes: AtomicU64,
}

impl Direction {
    fn new(shape: LinkShape) -> Direction {
        Direction {
            shape,
            busy_until: Mutex::new(Instant::now()),
            bytes: AtomicU64::new(0),
        }
    }

    /// Counts a chunk of `n` bytes read now; returns when it has left the serializer.
    fn reserve(&self, n: usize) -> Instant {
        self.bytes.fetch_add(n as u64, Ordering::SeqCst);
        let now = Instant::now();
        let Some(rate) = self.shape.rate else {
            return now;
        };
        let mut busy = self.busy_until.lock().expect("the serializer's lock");
        *busy = (*busy).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
        *busy
    }
}

/// A TCP proxy on 127.0.0.1 in front of one port there, the client's link to one host:
/// it counts the bytes it carries each way and, with a [`LinkShape`], shapes them. All
/// its connections share the link. Dropping it stops taking connections.
pub struct CountingProxy {
    port: u16,
    to_target: Arc<Direction>,
    from_target: Arc<Direction>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl CountingProxy {
    /// A proxy to 127.0.0.1:`target`, shaped by `shape`.
    pub fn start(target: u16, shape: LinkShape) -> std::io::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let to_target = Arc::new(Direction::new(shape));
        let from_target = Arc::new(Direction::new(shape));
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down, s) = (to_target.clone(), from_target.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (up, down) = (up.clone(), down.clone());
                std::thread::spawn(move || carry(client, target, &up, &down));
            }
        });
        Ok(CountingProxy {
            port,
            to_target,
            from_target,
            stop,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bytes it carried so far: (to the target, from the target).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.to_target.bytes.load(Ordering::SeqCst),
            self.from_target.bytes.load(Ordering::SeqCst),
        )
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Carries one connection both ways through the link until both sides end it.
fn carry(client: TcpStream, target: u16, up: &Arc<Direction>, down: &Arc<Direction>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (Ok(client_in), Ok(server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = up.clone();
    let upwards = std::thread::spawn(move || pump(client_in, server_out, &up));
    pump(server, client, down);
    let _ = upwards.join();
}

/// Copies `from` to `to` through `link` until `from` ends (then half-closes `to`) or
/// `to` fails (then stops reading `from`). A chunk is read only once the one before it
/// has left the serializer, so a sender faster than the link is held back by TCP's
/// flow control rather than buffered here.
fn pump(from: TcpStream, to: TcpStream, link: &Direction) {
    let shaped = link.shape.is_shaped();
    let mut buf = vec![0u8; if shaped { 16 << 10 } else { 64 << 10 }];
    let mut from_read = &from;
    if !shaped {
        let mut to_write = &to;
        while let Ok(n @ 1..) = from_read.read(&mut buf) {
            link.reserve(n);
            if to_write.write_all(&buf[..n]).is_err() {
                let _ = from.shutdown(Shutdown::Read);
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    // Chunks wait here for their delay; bounded, as a link holds only so much.
    let (queue, delivery) = mpsc::sync_channel::<(Instant, Option<Vec<u8>>)>(1024);
    let Ok(from_again) = from.try_clone() else {
        return;
    };
    let deliver = std::thread::spawn(move || {
        let mut to_write = &to;
        for (at, chunk) in delivery {
            sleep_until(at);
            let Some(chunk) = chunk else { break };
            if to_write.write_all(&chunk).is_err() {
                let _ = from_again.shutdown(Shutdown::Read);
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    while let Ok(n @ 1..) = from_read.read(&mut buf) {
        let sent = link.reserve(n);
        if queue
            .send((sent + link.shape.delay, Some(buf[..n].to_vec())))
            .is_err()
        {
            break;
        }
        sleep_until(sent);
    }
    let _ = queue.send((Instant::now() + link.shape.delay, None));
    drop(queue);
    let _ = deliver.join();
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}
