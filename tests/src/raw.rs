//! Raw HTTP/1.1 over a plain TCP socket, for tests about framing that an HTTP client would
//! not send (a `Content-Length` it does not keep, two of them, a broken request line).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as read off the socket.
#[derive(Debug)]
pub struct RawResponse {
    /// Every status line and header block received, interim ones (`100 Continue`) included.
    pub head: String,
    pub status: u16,
    pub body: String,
}

impl RawResponse {
    /// The body as JSON, if it is.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

/// Sends `head` (and `body`) to `addr` (`host:port`), then reads until the server closes the
/// connection or a complete final response arrived, within `deadline`.
pub async fn exchange(
    addr: &str,
    head: &str,
    body: &[u8],
    deadline: Duration,
) -> anyhow::Result<RawResponse> {
    tokio::time::timeout(deadline, async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        s.flush().await?;
        read_response(&mut s).await
    })
    .await
    .map_err(|_| anyhow::anyhow!("no complete answer from {addr} within {deadline:?}"))?
}

async fn read_response(s: &mut TcpStream) -> anyhow::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(r) = parse(&buf) {
            return Ok(r);
        }
        let n = match s.read(&mut chunk).await {
            Ok(n) => n,
            // A reset after the answer (the server closed with our body unread) still
            // leaves what arrived before it.
            Err(e) if !buf.is_empty() => {
                return parse_final(&buf)
                    .ok_or_else(|| anyhow::anyhow!("{e} after a partial answer"))
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return parse_final(&buf).ok_or_else(|| {
                anyhow::anyhow!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&buf)
                )
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A complete final response in `buf` (skipping `1xx` ones), with a `Content-Length` body.
fn parse(buf: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(buf);
    let mut from = 0;
    loop {
        let end = text[from..].find("\r\n\r\n")? + from;
        let block = &text[from..end];
        let status: u16 = block.split_whitespace().nth(1)?.parse().ok()?;
        if (100..200).contains(&status) {
            from = end + 4;
            continue;
        }
        let len: usize = block
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let body = &text[end + 4..];
        if body.len() < len {
            return None;
        }
        return Some(RawResponse {
            head: text[..end].to_string(),
            status,
            body: body[..len].to_string(),
        });
    }
}

fn parse_final(buf: &[u8]) -> Option<RawResponse> {
    parse(buf)
}
