//! The state in PostgreSQL: a thread of its own owns a current-thread tokio runtime and
//! the tokio-postgres client, and answers [`super::StateDb`]'s synchronous calls over a
//! channel. The state keeps one synchronous API, callable from the runner's async code
//! (which must not start a runtime inside its own), as it is over SQLite.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::mpsc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc as tokio_mpsc;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::sql::{postgres_ddl, postgres_query, DbError, Row, Value};

/// How long connecting may take when the URI does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The advisory lock migrations take, so clients that start at once upgrade the schema
/// once, in turn ("offload" in ASCII).
const MIGRATION_LOCK: i64 = 0x6f_6666_6c6f_6164;

/// A request to the thread that owns the connection.
enum Request {
    Query {
        sql: String,
        params: Vec<Value>,
        reply: mpsc::Sender<Result<Vec<Row>, DbError>>,
    },
    Migrate {
        migrations: &'static [&'static str],
        reply: mpsc::Sender<Result<(), DbError>>,
    },
}

/// A connection to the shared state database.
pub(crate) struct PgState {
    requests: tokio_mpsc::UnboundedSender<Request>,
}

impl PgState {
    /// Connects to `uri` (a libpq-style URI or key=value string).
    pub fn connect(uri: &str) -> Result<PgState, ConnectError> {
        let mut config: Config = uri.parse().map_err(|e| ConnectError::Uri(describe(&e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("offload");
        }
        let (ready, connected) = mpsc::channel();
        let (requests, incoming) = tokio_mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("offload-state".into())
            .spawn(move || serve(config, ready, incoming))
            .map_err(|e| ConnectError::Unreachable(format!("cannot start its thread: {e}")))?;
        match connected.recv() {
            Ok(Ok(())) => Ok(PgState { requests }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnectError::Unreachable("its thread ended".into())),
        }
    }

    /// Runs `sql` (SQLite's spelling) with `params`; the rows it returns.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let (reply, answer) = mpsc::channel();
        self.ask(Request::Query {
            sql: postgres_query(sql),
            params: params.to_vec(),
            reply,
        })?;
        answer.recv().unwrap_or_else(|_| Err(gone()))
    }

    /// Runs `sql` without waiting for its answer: it runs in order with every other
    /// request of this connection, and a failure is not heard of.
    pub fn send(&self, sql: &str, params: &[Value]) {
        let (reply, _) = mpsc::channel();
        let _ = self.ask(Request::Query {
            sql: postgres_query(sql),
            params: params.to_vec(),
            reply,
        });
    }

    /// Brings the schema to `migrations`, or refuses a newer one.
    pub fn migrate(&self, migrations: &'static [&'static str]) -> Result<(), DbError> {
        let (reply, answer) = mpsc::channel();
        self.ask(Request::Migrate { migrations, reply })?;
        answer.recv().unwrap_or_else(|_| Err(gone()))
    }

    fn ask(&self, request: Request) -> Result<(), DbError> {
        self.requests.send(request).map_err(|_| gone())
    }
}

/// Why the shared database cannot be used from the start.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The URI does not parse.
    Uri(String),
    /// The server cannot be reached or refused the connection.
    Unreachable(String),
}

fn gone() -> DbError {
    DbError::Postgres {
        message: "the connection is closed".into(),
        lost: true,
    }
}

/// The thread's life: connect, say so, answer requests until the state is dropped.
fn serve(
    config: Config,
    ready: mpsc::Sender<Result<(), ConnectError>>,
    mut incoming: tokio_mpsc::UnboundedReceiver<Request>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(ConnectError::Unreachable(format!(
                "cannot start its runtime: {e}"
            ))));
            return;
        }
    };
    runtime.block_on(async move {
        let (mut client, connection) = match config.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                let _ = ready.send(Err(ConnectError::Unreachable(describe(&e))));
                return;
            }
        };
        // Runs while requests are awaited on this thread.
        tokio::spawn(connection);
        let _ = ready.send(Ok(()));
        let mut statements: HashMap<String, Statement> = HashMap::new();
        while let Some(request) = incoming.recv().await {
            match request {
                Request::Query { sql, params, reply } => {
                    let rows = query(&client, &mut statements, &sql, &params).await;
                    let _ = reply.send(rows.map_err(|e| pg_error(&client, &e)));
                }
                Request::Migrate { migrations, reply } => {
                    let _ = reply.send(migrate(&mut client, migrations).await);
                }
            }
        }
    });
}

async fn query(
    client: &Client,
    statements: &mut HashMap<String, Statement>,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let statement = match statements.get(sql) {
        Some(s) => s.clone(),
        None => {
            let s = client.prepare(sql).await?;
            statements.insert(sql.to_string(), s.clone());
            s
        }
    };
    let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    let rows = client.query(&statement, &params).await?;
    rows.iter().map(read_row).collect()
}

fn read_row(row: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let v = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(Value::from),
            Type::FLOAT4 => row
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Real(v.into())),
            // Whatever else a query returns (FLOAT8 and text) reads as its type says.
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

/// Runs the migrations the database has not had, under an advisory lock, in one
/// transaction; its version is kept in `offload_schema`.
async fn migrate(client: &mut Client, migrations: &[&str]) -> Result<(), DbError> {
    let known = migrations.len() as i64;
    let tx = client.transaction().await.map_err(|e| plain(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| plain(&e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS offload_schema (version BIGINT NOT NULL)")
        .await
        .map_err(|e| plain(&e))?;
    let done: i64 = match tx
        .query_opt("SELECT version FROM offload_schema", &[])
        .await
        .map_err(|e| plain(&e))?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO offload_schema (version) VALUES (0)", &[])
                .await
                .map_err(|e| plain(&e))?;
            0
        }
    };
    if done > known {
        return Err(DbError::Other(format!(
            "its schema is version {done}, newer than this offload's {known}: a newer \
             offload upgraded it; upgrade offload here to use it"
        )));
    }
    for sql in &migrations[done as usize..] {
        tx.batch_execute(&postgres_ddl(sql))
            .await
            .map_err(|e| plain(&e))?;
    }
    tx.execute("UPDATE offload_schema SET version = $1", &[&known])
        .await
        .map_err(|e| plain(&e))?;
    tx.commit().await.map_err(|e| plain(&e))
}

fn plain(e: &tokio_postgres::Error) -> DbError {
    DbError::Postgres {
        message: describe(e),
        lost: e.is_closed() || connection_class(e),
    }
}

/// `e` as a [`DbError`]: lost when the connection is (or is being) closed.
fn pg_error(client: &Client, e: &tokio_postgres::Error) -> DbError {
    DbError::Postgres {
        message: describe(e),
        lost: client.is_closed() || e.is_closed() || connection_class(e),
    }
}

/// Whether the server said the session ends: a connection exception (class 08), or a
/// shutdown or crash of the server (57P).
fn connection_class(e: &tokio_postgres::Error) -> bool {
    if e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    e.code().is_some_and(|c| {
        let code = c.code();
        code.starts_with("08") || code.starts_with("57P")
    })
}

/// What went wrong, with the server's own message when it sent one (tokio-postgres's
/// own text is only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match e.source() {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

impl ToSql for Value {
    /// Each value as the parameter's type takes it: the server infers the types from
    /// the query, and one integer can fill an `INT8`, a `FLOAT8` or a `BOOL`.
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(v), &Type::INT4) => i32::try_from(*v)?.to_sql(ty, out),
            (Value::Int(v), &Type::INT2) => i16::try_from(*v)?.to_sql(ty, out),
            (Value::Int(v), &Type::FLOAT8) => (*v as f64).to_sql(ty, out),
            (Value::Int(v), &Type::BOOL) => (*v != 0).to_sql(ty, out),
            (Value::Int(v), _) => v.to_sql(ty, out),
            (Value::Real(v), &Type::FLOAT4) => (*v as f32).to_sql(ty, out),
            (Value::Real(v), _) => v.to_sql(ty, out),
            (Value::Text(v), _) => v.as_str().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}
