//! A TCP relay that plays the network between a client and fake-aws: it forwards, or it
//! blackholes (reads and forwards nothing, closes nothing: what `iptables -j DROP` does to
//! an established connection and to a SYN), or it resets every connection (a reset storm).
//! No root rights needed.
//!
//! A blackhole is the way NAT timeouts, VPN drops and sleeping laptops break links: the
//! connections that lived through it never carry a byte again (the NAT forgot them) and
//! never end either; only connections made after it work.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    Forwarding,
    Blackhole,
    Resetting,
}

/// The relay's state: what the network does now, and which generation of connections it
/// still carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Weather {
    network: Network,
    epoch: u64,
}

pub(crate) struct Relay {
    addr: SocketAddr,
    weather: watch::Sender<Weather>,
    upstream: watch::Sender<Option<SocketAddr>>,
}

impl Relay {
    /// Listens; forwards once `forward_to` names the upstream.
    pub(crate) async fn bind() -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (weather, _) = watch::channel(Weather {
            network: Network::Forwarding,
            epoch: 0,
        });
        let (upstream, _) = watch::channel(None);
        let (weather_rx, upstream_rx) = (weather.subscribe(), upstream.subscribe());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (weather, mut upstream) = (weather_rx.clone(), upstream_rx.clone());
                tokio::spawn(async move {
                    let Ok(to) = upstream.wait_for(Option::is_some).await.map(|a| a.unwrap())
                    else {
                        return;
                    };
                    carry(client, to, weather).await;
                });
            }
        });
        Relay {
            addr,
            weather,
            upstream,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn forward_to(&self, upstream: SocketAddr) {
        self.upstream.send_replace(Some(upstream));
    }

    fn set(&self, network: Network) {
        self.weather.send_modify(|w| {
            w.network = network;
            w.epoch += 1;
        });
    }

    /// Nothing crosses any more, in either direction, on any connection; new connections
    /// are accepted and carry nothing (as a dropped SYN, they never get an answer).
    pub(crate) fn blackhole(&self) {
        self.set(Network::Blackhole);
    }

    /// Every connection, open or new, is reset.
    pub(crate) fn reset_storm(&self) {
        self.set(Network::Resetting);
    }

    /// New connections work again; the ones that lived through a blackhole stay dead.
    pub(crate) fn restore(&self) {
        self.set(Network::Forwarding);
    }
}

// A zero linger makes close send a reset and does not block (the deprecation is about a
// non-zero linger blocking the thread in drop).
#[allow(deprecated)]
async fn carry(client: TcpStream, to: SocketAddr, mut weather: watch::Receiver<Weather>) {
    let born = *weather.borrow_and_update();
    // Linger 0: closing a socket resets it.
    client.set_linger(Some(Duration::ZERO)).ok();
    if born.network == Network::Resetting {
        return;
    }
    let Ok(server) = TcpStream::connect(to).await else {
        return;
    };
    server.set_linger(Some(Duration::ZERO)).ok();
    client.set_nodelay(true).ok();
    server.set_nodelay(true).ok();
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = tokio::spawn(pipe(client_read, server_write, born.epoch, weather.clone()));
    let down = tokio::spawn(pipe(server_read, client_write, born.epoch, weather));
    // Either direction ending ends both (a reset, or a close passed on).
    tokio::select! { _ = up => {}, _ = down => {} }
}

/// Copies one direction while the network carries this connection's generation; parks
/// (reading nothing, so the sender's buffers fill) while it does not; returns on a reset.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    epoch: u64,
    mut weather: watch::Receiver<Weather>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let carried = weather
            .wait_for(|w| {
                w.network == Network::Resetting
                    || (w.network == Network::Forwarding && w.epoch == epoch)
            })
            .await
            .map(|w| w.network)
            .ok();
        if carried != Some(Network::Forwarding) {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = weather.changed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // What was read when the weather turned is lost with the link.
        if weather.borrow().network != Network::Forwarding || weather.borrow().epoch != epoch {
            continue;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
