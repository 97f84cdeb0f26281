//! [`LinkCutter`]: a TCP proxy on loopback that cuts its link under load, as a network
//! that fails in the middle of a transfer.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
