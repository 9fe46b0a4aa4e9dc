//! A TCP proxy on loopback between one host's agent and one control node, with switches that
//! cut the host off: the agent's `control_endpoints` name its proxies, so a cut stops every
//! byte of that host's traffic, long-polls included, while the control node and every other
//! host see nothing change.
//!
//! Any change of [`Mode`] closes every connection open at that moment (so a cut also ends the
//! long-polls in flight, and a heal never hands a client half an answer); new connections
//! then get the new mode. Everything stays on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a proxy does with the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Open,
    /// Cut, refusing: every connection is reset at once.
    Refuse,
    /// Cut, silent: connections are accepted and held, what is sent is dropped, nothing comes
    /// back (as when packets are lost): the client waits for its timeout.
    Blackhole,
    /// One way: the agent's bytes reach the control node, its answers are dropped.
    OnlyToControl,
    /// The other way: the agent's bytes are dropped, the control node's reach the agent.
    OnlyToAgent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToControl,
    ToAgent,
}

impl Mode {
    fn passes(self, dir: Dir) -> bool {
        match self {
            Mode::Open => true,
            Mode::Refuse | Mode::Blackhole => false,
            Mode::OnlyToControl => dir == Dir::ToControl,
            Mode::OnlyToAgent => dir == Dir::ToAgent,
        }
    }
}

/// One proxy. Dropping it closes its listener and every connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream` (a loopback address).
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Proxy> {
        anyhow::ensure!(
            upstream.ip().is_loopback(),
            "the proxy only forwards to loopback, not {upstream}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Open);
        let task = tokio::spawn(serve(listener, upstream, rx));
        Ok(Proxy { addr, mode, task })
    }

    /// `http://127.0.0.1:PORT`, for the agent's `control_endpoints`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Switches the mode; every open connection is closed.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, upstream: SocketAddr, rx: watch::Receiver<Mode>) {
    loop {
        let Ok((down, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(connection(down, upstream, rx.clone()));
    }
}

/// Returns when the mode changes or the proxy is gone.
async fn changed(mut rx: watch::Receiver<Mode>) {
    let _ = rx.changed().await;
}

async fn connection(down: TcpStream, upstream: SocketAddr, mut rx: watch::Receiver<Mode>) {
    let mode = *rx.borrow_and_update();
    match mode {
        Mode::Refuse => {
            // A reset, not an orderly close.
            let _ = down.set_zero_linger();
            return;
        }
        Mode::Blackhole => {
            let mut down = down;
            let mut buf = vec![0u8; 16 * 1024];
            tokio::select! {
                _ = changed(rx) => {}
                _ = async { while matches!(down.read(&mut buf).await, Ok(n) if n > 0) {} } => {}
            }
            return;
        }
        _ => {}
    }
    let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream));
    let up = tokio::select! {
        _ = changed(rx.clone()) => return,
        r = connect => match r {
            Ok(Ok(s)) => s,
            _ => return,
        },
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    tokio::select! {
        _ = changed(rx.clone()) => {}
        _ = pump(dr, uw, rx.clone(), Dir::ToControl) => {}
        _ = pump(ur, dw, rx, Dir::ToAgent) => {}
    }
}

/// Copies `r` to `w` while the mode lets `dir` through, dropping the bytes otherwise; returns
/// at the end of `r` or on an error.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    rx: watch::Receiver<Mode>,
    dir: Dir,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let pass = rx.borrow().passes(dir);
        if pass && w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_pass_the_right_directions() {
        let table = [
            (Mode::Open, true, true),
            (Mode::Refuse, false, false),
            (Mode::Blackhole, false, false),
            (Mode::OnlyToControl, true, false),
            (Mode::OnlyToAgent, false, true),
        ];
        for (m, to_control, to_agent) in table {
            assert_eq!(m.passes(Dir::ToControl), to_control, "{m:?}");
            assert_eq!(m.passes(Dir::ToAgent), to_agent, "{m:?}");
        }
    }

    /// An echo server behind a proxy: open it echoes, cut it does not, healed it does again,
    /// and a cut ends a connection that was open.
    #[tokio::test]
    async fn cut_and_heal() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let p = Proxy::start(upstream).await?;
        let addr = p.addr;
        let roundtrip = |mut s: TcpStream| async move {
            s.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf))
                .await
                .map_err(|_| anyhow::anyhow!("no answer"))??;
            anyhow::ensure!(&buf == b"ping");
            Ok::<TcpStream, anyhow::Error>(s)
        };
        let held = roundtrip(TcpStream::connect(addr).await?).await?;
        for cut in [Mode::Blackhole, Mode::OnlyToControl, Mode::OnlyToAgent] {
            p.set(cut);
            assert!(
                roundtrip(TcpStream::connect(addr).await?).await.is_err(),
                "{cut:?}"
            );
        }
        p.set(Mode::Refuse);
        let refused = roundtrip(TcpStream::connect(addr).await?).await;
        assert!(refused.is_err());
        // The connection open before the cuts was closed by the first one.
        let mut held = held;
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(2), held.read(&mut buf)).await?;
        assert!(matches!(r, Ok(0) | Err(_)), "closed: {r:?}");
        p.set(Mode::Open);
        roundtrip(TcpStream::connect(addr).await?).await?;
        Ok(())
    }
}
