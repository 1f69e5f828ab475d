//! Blocking client for the control socket, used by the CLI. One request per
//! connection (`Connection: close`); responses are parsed with httparse.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the dunnage daemon at {path}: {source}; is `dunnage serve` running with this --run-dir (or DUNNAGE_RUN_DIR)?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent a malformed response: {0}")]
    Protocol(String),
    /// The daemon refused the request; the message is for the user.
    #[error("{0}")]
    Refused(String),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(run_dir: &Path) -> Self {
        Client {
            socket: run_dir.join("control.sock"),
        }
    }

    pub fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ClientError> {
        self.request("GET", path, None)
    }

    pub fn post<A: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        args: &A,
    ) -> Result<R, ClientError> {
        let body = serde_json::to_vec(args).expect("arguments serialise");
        self.request("POST", path, Some(&body))
    }

    fn request<R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<R, ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        // Mount and attach run mkfs; give them time, but never hang forever.
        stream
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(io)?;
        let body = body.unwrap_or(b"");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: dunnage\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(io)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let header_len = match resp.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return Err(ClientError::Protocol("truncated response".into()))
            }
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        let chunked = resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && String::from_utf8_lossy(h.value)
                    .to_ascii_lowercase()
                    .contains("chunked")
        });
        let body = if chunked {
            dechunk(&raw[header_len..])?
        } else {
            raw[header_len..].to_vec()
        };
        if status != 200 {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Refused(msg));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

/// Undo HTTP/1.1 chunked transfer coding.
fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete((used, 0))) => {
                let _ = used;
                return Ok(out);
            }
            Ok(httparse::Status::Complete((used, size))) => {
                let start = used;
                let end = start + size as usize;
                if data.len() < end + 2 {
                    return Err(ClientError::Protocol("truncated chunk".into()));
                }
                out.extend_from_slice(&data[start..end]);
                data = &data[end + 2..];
            }
            _ => return Err(ClientError::Protocol("bad chunk size".into())),
        }
    }
}
