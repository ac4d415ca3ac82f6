//! A PostgreSQL connection that speaks just enough of the protocol for the backfill's COPY
//! workers: startup and authentication (trust, password, md5, SCRAM-SHA-256), simple
//! queries, and `COPY … TO STDOUT` whose CopyData payloads go straight from the socket
//! buffer to the caller.
//!
//! tokio-postgres hands every CopyData message to its caller through a channel as its own
//! `Bytes` (PostgreSQL sends one per row); at SF 10 that bookkeeping cost about a fifth of
//! the backfill's own CPU. Everything else in Weir uses tokio-postgres.

use std::str::FromStr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::Config;
use tokio_postgres::config::Host;

use crate::conn::{PgError, describe, redact};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 256 << 10;

pub struct RawConnection {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    out: BytesMut,
    target: String,
}

impl RawConnection {
    /// Connects and authenticates with the settings of a `postgres://` URL (its first host).
    pub async fn connect(url: &str) -> Result<Self, PgError> {
        let cfg = Config::from_str(url).map_err(|e| PgError::Url { url: redact(url), message: e.to_string() })?;
        let target = describe(&cfg);
        let err = |message: String| PgError::Raw { context: format!("connecting to PostgreSQL at {target}"), message };
        let user = cfg.get_user().ok_or_else(|| PgError::Url { url: redact(url), message: "no user given".into() })?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let timeout = cfg.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
        let stream: Box<dyn Stream> = match cfg.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| err(format!("timed out after {timeout:?}")))?
                    .map_err(|e| err(e.to_string()))?;
                s.set_nodelay(true).map_err(|e| err(e.to_string()))?;
                Box::new(s)
            }
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                    .await
                    .map_err(|_| err(format!("timed out after {timeout:?}")))?
                    .map_err(|e| err(format!("{}: {e}", path.display())))?;
                Box::new(s)
            }
            None => return Err(PgError::Url { url: redact(url), message: "no host given".into() }),
        };
        let mut conn =
            Self { stream, buf: BytesMut::with_capacity(READ_BYTES), out: BytesMut::new(), target: target.clone() };
        let db = cfg.get_dbname().unwrap_or(user);
        let params = [("user", user), ("database", db), ("application_name", "weir"), ("client_encoding", "UTF8")];
        frontend::startup_message(params.iter().copied(), &mut conn.out).map_err(|e| err(e.to_string()))?;
        conn.flush().await?;
        let password = cfg.get_password();
        let mut scram = None;
        loop {
            let (tag, body) = conn.message().await?;
            match tag {
                b'R' => {
                    let kind = body.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    let need = || err("the server asks for a password and the URL has none".to_string());
                    match kind {
                        Some(0) => {}
                        Some(3) => {
                            frontend::password_message(password.ok_or_else(need)?, &mut conn.out)
                                .map_err(|e| err(e.to_string()))?;
                        }
                        Some(5) if body.len() >= 8 => {
                            let salt = [body[4], body[5], body[6], body[7]];
                            let hash = md5_hash(user.as_bytes(), password.ok_or_else(need)?, salt);
                            frontend::password_message(hash.as_bytes(), &mut conn.out)
                                .map_err(|e| err(e.to_string()))?;
                        }
                        Some(10) => {
                            let offers = body[4..].split(|b| *b == 0).any(|m| m == SCRAM_SHA_256.as_bytes());
                            if !offers {
                                return Err(err("the server offers no SASL mechanism Weir supports".to_string()));
                            }
                            let s = ScramSha256::new(password.ok_or_else(need)?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut conn.out)
                                .map_err(|e| err(e.to_string()))?;
                            scram = Some(s);
                        }
                        Some(11) => {
                            let s = scram.as_mut().ok_or_else(|| err("unexpected SASL continue".to_string()))?;
                            s.update(&body[4..]).map_err(|e| err(format!("SCRAM: {e}")))?;
                            frontend::sasl_response(s.message(), &mut conn.out).map_err(|e| err(e.to_string()))?;
                        }
                        Some(12) => {
                            let s = scram.as_mut().ok_or_else(|| err("unexpected SASL final".to_string()))?;
                            s.finish(&body[4..]).map_err(|e| err(format!("SCRAM: {e}")))?;
                        }
                        other => return Err(err(format!("unsupported authentication request {other:?}"))),
                    }
                    conn.flush().await?;
                }
                b'E' => return Err(err(server_error(&body))),
                b'Z' => return Ok(conn),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    /// Runs `sql` (one or more statements) with the simple query protocol.
    pub async fn execute(&mut self, sql: &str, context: &str) -> Result<(), PgError> {
        self.send_query(sql, context).await?;
        // The same reading as a COPY's: rows of a query are not CopyData, so this drains to
        // ReadyForQuery and returns the first error the server sent.
        while self.read_copy(context, |_| Ok::<(), PgError>(())).await? {}
        Ok(())
    }

    /// Starts `COPY … TO STDOUT`; read its data with [`RawConnection::read_copy`].
    pub async fn start_copy(&mut self, sql: &str, context: &str) -> Result<(), PgError> {
        self.send_query(sql, context).await
    }

    /// Calls `f` with the payload of every complete CopyData message the socket has for now
    /// (reading when there is none). Returns `Ok(false)` once the COPY has finished and the
    /// connection is ready for the next query.
    pub async fn read_copy<E: From<PgError>>(
        &mut self,
        context: &str,
        mut f: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<bool, E> {
        let mut failed = None;
        loop {
            let mut pos = 0;
            let mut data = false;
            while let Some((tag, len)) = header(&self.buf[pos..]) {
                let body = &self.buf[pos + 5..pos + 1 + len];
                match tag {
                    b'd' => {
                        f(body)?;
                        data = true;
                    }
                    b'E' => failed = Some(server_error(body)),
                    b'Z' => {
                        self.buf.advance(pos + 1 + len);
                        return match failed {
                            Some(message) => Err(PgError::Raw { context: context.to_string(), message }.into()),
                            None => Ok(false),
                        };
                    }
                    // CopyOutResponse, CopyDone, CommandComplete, notices.
                    _ => {}
                }
                pos += 1 + len;
            }
            self.buf.advance(pos);
            if data {
                return Ok(true);
            }
            self.fill().await?;
        }
    }

    async fn send_query(&mut self, sql: &str, context: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.out)
            .map_err(|e| PgError::Raw { context: context.to_string(), message: e.to_string() })?;
        self.flush().await
    }

    /// The next whole message: its tag and body.
    async fn message(&mut self) -> Result<(u8, BytesMut), PgError> {
        loop {
            if let Some((tag, len)) = header(&self.buf) {
                let mut m = self.buf.split_to(1 + len);
                m.advance(5);
                return Ok((tag, m));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), PgError> {
        self.buf.reserve(READ_BYTES);
        let n = self.stream.read_buf(&mut self.buf).await.map_err(|e| self.io_err(e))?;
        if n == 0 {
            return Err(PgError::Raw {
                context: format!("PostgreSQL at {}", self.target),
                message: "the server closed the connection".to_string(),
            });
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        let out = self.out.split();
        self.stream.write_all(&out).await.map_err(|e| self.io_err(e))?;
        self.stream.flush().await.map_err(|e| self.io_err(e))
    }

    fn io_err(&self, e: std::io::Error) -> PgError {
        PgError::Raw { context: format!("PostgreSQL at {}", self.target), message: e.to_string() }
    }
}

/// The tag and length (without the tag) of the complete message at the start of `b`.
fn header(b: &[u8]) -> Option<(u8, usize)> {
    if b.len() < 5 {
        return None;
    }
    // A length below 4 (the length field itself) is malformed: taken as an empty body.
    let len = (u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize).max(4);
    (b.len() > len).then_some((b[0], len))
}

/// "message (detail) [SQLSTATE]" from an ErrorResponse body.
fn server_error(body: &[u8]) -> String {
    let (mut message, mut detail, mut code) = (String::new(), None, String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'C' => code = value,
            _ => {}
        }
    }
    match detail {
        Some(d) => format!("{message} ({d}) [SQLSTATE {code}]"),
        None => format!("{message} [SQLSTATE {code}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_errors() {
        assert_eq!(header(b"d\0\0\0\x06ab"), Some((b'd', 6)));
        assert_eq!(header(b"d\0\0\0\x06a"), None);
        assert_eq!(header(b"d\0\0"), None);
        assert_eq!(header(b"d\0\0\0\x02"), Some((b'd', 4)), "a length below 4 is an empty body");
        assert_eq!(
            server_error(b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0"),
            "relation \"x\" does not exist [SQLSTATE 42P01]"
        );
        assert_eq!(server_error(b"Mbad\0Dwhy\0C22000\0\0"), "bad (why) [SQLSTATE 22000]");
    }
}
