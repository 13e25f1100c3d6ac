//! Admission of TCP connections to both listeners, so that sockets which never speak cannot
//! hold the slots that phones, payment services and operators need.
//!
//! Every accepted connection holds a slot of its listener (`max_connections`) and one of its
//! source address (`max_per_address`) until it closes; at the total limit, new clients wait
//! in the kernel's accept queue. A connection over its address's limit is closed at once.
//! gRPC connections run their TLS handshake (TLS 1.3 only) here, at most `max_handshaking`
//! at a time and each within `handshake_timeout`. An established connection is closed once
//! its client has been idle for `idle_timeout`: for gRPC, idle means no HTTP/2 frame but
//! PING (so the server's keepalive pings, which the client answers, do not keep an unused
//! connection alive, and neither does a long-lived stream such as health `Watch` on which the
//! client sends nothing); for HTTP, no byte at all. An HTTP connection also ends at
//! `max_lifetime`, which stops a client that trickles a header a byte at a time.
//!
//! Accept errors never end a listener. Running out of file descriptors (`EMFILE`, `ENFILE`)
//! or kernel memory makes the loop back off (50 ms, doubling to 1 s) instead of spinning.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// How one listener admits and keeps connections.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// `grpc` or `http`, for metrics and logs.
    pub listener: &'static str,
    pub max_connections: usize,
    pub max_per_address: usize,
    /// Most TLS handshakes in progress at once (gRPC only).
    pub max_handshaking: usize,
    /// Most TLS handshakes in progress from one source address (gRPC only), so that one
    /// address cannot hold every handshake turn.
    pub max_handshaking_per_address: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// Longest a connection may stay open, idle or not (`None`: no limit).
    pub max_lifetime: Option<Duration>,
}

/// What counts as activity of the client on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActivityKind {
    /// Any byte read.
    Bytes,
    /// Any HTTP/2 frame read but PING.
    Http2Frames,
}

/// First backoff after an accept error that signals exhaustion, and the longest.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// HTTP/2 client connection preface (RFC 9113 §3.4): 24 bytes before the first frame.
const HTTP2_PREFACE_LEN: usize = 24;
const HTTP2_FRAME_HEADER_LEN: usize = 9;
const HTTP2_PING: u8 = 0x6;
/// Frame types that keep a connection up without using it: SETTINGS, PING, WINDOW_UPDATE.
const HTTP2_UPKEEP: [u8; 3] = [0x4, HTTP2_PING, 0x8];

/// Whether an accept error means the process or the kernel ran out of something, so that
/// retrying at once would spin.
fn is_exhaustion(error: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(error.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Calls `accept` until it gives a connection. Exhaustion errors back off (doubling up to
/// [`ACCEPT_BACKOFF_MAX`]); other errors (a connection reset before it was accepted) retry
/// at once. Errors are logged, exhaustion at most once per backoff.
async fn accept_with_backoff<F, Fut, T>(listener: &'static str, mut accept: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        match accept().await {
            Ok(accepted) => return accepted,
            Err(e) if is_exhaustion(&e) => {
                tracing::warn!(
                    listener,
                    error = %e,
                    backoff_ms = backoff.as_millis() as u64,
                    "accept failed: out of file descriptors or memory; backing off"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
            Err(e) => tracing::debug!(listener, error = %e, "accept failed"),
        }
    }
}

/// Open connections per source address.
#[derive(Default)]
struct AddressTable {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A connection's share of its address's limit; given back when dropped.
struct AddressSlot {
    table: Arc<AddressTable>,
    address: IpAddr,
}

/// The address a limit counts by: an IPv4 address, or an IPv6 address's /64 (one host or
/// subscriber is commonly given a whole /64, so counting /128s would not limit it).
pub fn address_group(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(octets.into())
            }
        },
    }
}

impl AddressTable {
    /// Takes a slot for `address` (its group, see [`address_group`]) if that group has fewer
    /// than `max` connections open.
    fn take(self: &Arc<Self>, address: IpAddr, max: usize) -> Option<AddressSlot> {
        let address = address_group(address);
        let mut open = self.open.lock().unpoisoned();
        let count = open.entry(address).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unpoisoned();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// The slots an admitted connection holds until it closes.
struct Slots {
    _listener: OwnedSemaphorePermit,
    _address: AddressSlot,
    /// `payra_connections_open` for this listener, counted down when the connection closes.
    open: prometheus::IntGauge,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Admits connections to one listener.
#[derive(Clone)]
struct Admission {
    limits: AdmissionLimits,
    slots: Arc<Semaphore>,
    addresses: Arc<AddressTable>,
    metrics: Arc<Metrics>,
}

impl Admission {
    fn new(limits: AdmissionLimits, metrics: Arc<Metrics>) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            addresses: Arc::new(AddressTable::default()),
            limits,
            metrics,
        }
    }

    fn refuse(&self, reason: &str) {
        self.metrics
            .connections_refused
            .with_label_values(&[self.limits.listener, reason])
            .inc();
    }

    /// The next connection within the limits, with its slots.
    async fn admit(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, Slots) {
        loop {
            // `slots` is never closed, so acquiring cannot fail.
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                continue;
            };
            let (stream, peer) =
                accept_with_backoff(self.limits.listener, || listener.accept()).await;
            let Some(address) = self
                .addresses
                .take(peer.ip(), self.limits.max_per_address.max(1))
            else {
                // Dropping the stream closes it; the slot goes back with the permit.
                self.refuse("per_address_limit");
                tracing::debug!(listener = self.limits.listener, %peer, "connection over its address's limit closed");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let open = self
                .metrics
                .connections_open
                .with_label_values(&[self.limits.listener]);
            open.inc();
            let slots = Slots {
                _listener: permit,
                _address: address,
                open,
            };
            return (stream, peer, slots);
        }
    }
}

/// Finds the HTTP/2 frames in one direction of a connection's bytes and says whether any of
/// them is a request's or a response's (RFC 9113 §4.1: 9-byte header, type in byte 3).
struct FrameScanner {
    /// Connection-preface bytes still to skip (the client's direction only).
    preface_left: usize,
    header: [u8; HTTP2_FRAME_HEADER_LEN],
    header_len: usize,
    payload_left: usize,
}

impl FrameScanner {
    fn new(preface: usize) -> FrameScanner {
        FrameScanner {
            preface_left: preface,
            header: [0; HTTP2_FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Whether `bytes` complete a frame header of a kind that counts as use: anything but
    /// connection upkeep (PING, SETTINGS, WINDOW_UPDATE), which a peer can send for ever
    /// without using the connection.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut used = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (HTTP2_FRAME_HEADER_LEN - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == HTTP2_FRAME_HEADER_LEN {
                    let length =
                        u32::from_be_bytes([0, self.header[0], self.header[1], self.header[2]])
                            as usize;
                    if !HTTP2_UPKEEP.contains(&self.header[3]) {
                        used = true;
                    }
                    self.payload_left = length;
                    self.header_len = 0;
                }
            }
        }
        used
    }
}

/// Tracks a connection's use and says when it has been idle too long.
struct IdleClock {
    kind: ActivityKind,
    timeout: Duration,
    last_activity: Instant,
    /// Fires at `last_activity + timeout` as it stood when armed; re-armed when it fires.
    timer: Pin<Box<Sleep>>,
    /// Ends the connection regardless of activity.
    lifetime: Option<Pin<Box<Sleep>>>,
    /// Set by use since the timer last fired: the hot path only sets a flag, and the clock is
    /// read when the timer fires (so a connection goes between one and two timeouts after its
    /// last use).
    used: bool,
    /// HTTP/2 frames from the client.
    read_frames: FrameScanner,
}

/// A server write this large is a response, not upkeep (a PING answer is 17 bytes, a
/// WINDOW_UPDATE 13, a SETTINGS acknowledgement 9).
const UPKEEP_WRITE_MAX: usize = 64;

impl IdleClock {
    fn new(kind: ActivityKind, timeout: Duration, lifetime: Option<Duration>) -> IdleClock {
        let now = Instant::now();
        IdleClock {
            kind,
            timeout,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
            lifetime: lifetime.map(|l| Box::pin(tokio::time::sleep_until(now + l))),
            used: false,
            read_frames: FrameScanner::new(HTTP2_PREFACE_LEN),
        }
    }

    /// Looks at bytes the client sent; notes activity if they count.
    fn saw(&mut self, bytes: &[u8]) {
        let used = match self.kind {
            ActivityKind::Bytes => !bytes.is_empty(),
            ActivityKind::Http2Frames => self.read_frames.scan(bytes),
        };
        self.used |= used;
    }

    /// Looks at bytes the server wrote: a response in progress (a server stream sending
    /// progress, a large download) is use of the connection too.
    fn wrote(&mut self, bytes: &[u8]) {
        self.used |= match self.kind {
            ActivityKind::Bytes => !bytes.is_empty(),
            ActivityKind::Http2Frames => bytes.len() > UPKEEP_WRITE_MAX,
        };
    }

    /// `Ready` once the connection must end: idle past the timeout, or past its lifetime.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(lifetime) = self.lifetime.as_mut() {
            if lifetime.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        // The timer is re-armed only when it fires: resetting it on every read would take the
        // timer wheel's lock once per read on the hot path.
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    if std::mem::take(&mut self.used) {
                        self.last_activity = Instant::now();
                    }
                    let deadline = self.last_activity + self.timeout;
                    if deadline <= Instant::now() {
                        return Poll::Ready(());
                    }
                    self.timer.as_mut().reset(deadline);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

use std::future::Future as _;

/// A connection that holds its slots until it is dropped, and fails its reads once its client
/// has been idle too long (so the server closes it).
pub struct AdmittedStream<S> {
    inner: S,
    idle: IdleClock,
    _slots: Slots,
}

impl<S: Connected> Connected for AdmittedStream<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AdmittedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.idle.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.idle.poll_expired(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection idle or too old",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AdmittedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.idle.wrote(&buf[..n]);
        }
        written
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = written {
            for buf in bufs {
                let taken = n.min(buf.len());
                this.idle.wrote(&buf[..taken]);
                n -= taken;
                if n == 0 {
                    break;
                }
            }
        }
        written
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The gRPC listener's connections: admitted, then through a TLS handshake with `tls` (at
/// most `max_handshaking` at once, each within `handshake_timeout`), in the order their
/// handshakes finish. The stream never ends.
pub fn grpc_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: AdmissionLimits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = io::Result<AdmittedStream<TlsStream<TcpStream>>>> {
    let admission = Admission::new(limits, metrics);
    let handshakes = Arc::new(Semaphore::new(admission.limits.max_handshaking.max(1)));
    let turns = Arc::new(AddressTurns::default());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Bounded: when tonic stops taking connections, the handshakes wait rather than pile up.
    let (done, ready) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // When the server stops taking connections (shutdown drops the stream), the loop
            // ends and the listening socket closes with it.
            let (stream, peer, slots) = tokio::select! {
                _ = done.closed() => return,
                admitted = admission.admit(&listener) => admitted,
            };
            let acceptor = acceptor.clone();
            let admission = admission.clone();
            let handshakes = handshakes.clone();
            let turns = turns.clone();
            let sender = done.clone();
            tokio::spawn(async move {
                let limits = &admission.limits;
                // The deadline runs from the accept: waiting for a turn counts. A connection
                // first waits for one of its address's turns, then for a global one, so one
                // address never holds more than its share of the global turns.
                let handshake = tokio::time::timeout(limits.handshake_timeout, async {
                    let _address_turn = turns
                        .turn(peer.ip(), limits.max_handshaking_per_address.max(1))
                        .await;
                    let _turn = handshakes.acquire_owned().await;
                    acceptor.accept(stream).await
                })
                .await;
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        admission.refuse("handshake_failed");
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        admission.refuse("handshake_timeout");
                        tracing::debug!(%peer, "TLS handshake not finished in time; closed");
                        return;
                    }
                };
                let stream = AdmittedStream {
                    inner: tls,
                    idle: IdleClock::new(
                        ActivityKind::Http2Frames,
                        limits.idle_timeout,
                        limits.max_lifetime,
                    ),
                    _slots: slots,
                };
                let _ = sender.send(Ok(stream)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(ready)
}

/// Handshake turns per address group: a connection waits for one of its address's turns.
#[derive(Default)]
struct AddressTurns {
    turns: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl AddressTurns {
    /// Waits for one of `address`'s `max` turns. The semaphore of an address nobody holds or
    /// waits for is dropped, so the map holds only addresses with connections in handshake.
    async fn turn(&self, address: IpAddr, max: usize) -> Option<AddressTurn<'_>> {
        let address = address_group(address);
        let semaphore = {
            let mut turns = self.turns.lock().unpoisoned();
            // Entries of waiters that timed out are left behind; sweep them now and then.
            if turns.len() > 10_000 {
                turns.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
            }
            turns
                .entry(address)
                .or_insert_with(|| Arc::new(Semaphore::new(max)))
                .clone()
        };
        let permit = semaphore.clone().acquire_owned().await.ok()?;
        Some(AddressTurn {
            turns: self,
            address,
            _permit: Some(permit),
            semaphore,
        })
    }
}

/// One address's handshake turn; given back when dropped.
struct AddressTurn<'a> {
    turns: &'a AddressTurns,
    address: IpAddr,
    _permit: Option<OwnedSemaphorePermit>,
    semaphore: Arc<Semaphore>,
}

impl Drop for AddressTurn<'_> {
    fn drop(&mut self) {
        drop(self._permit.take());
        let mut turns = self.turns.turns.lock().unpoisoned();
        // Held by the map and by this turn only: nobody else holds or waits.
        if Arc::strong_count(&self.semaphore) == 2 {
            turns.remove(&self.address);
        }
    }
}

/// The HTTP listener's connections, for `axum::serve`.
pub struct HttpListener {
    listener: TcpListener,
    admission: Admission,
}

impl HttpListener {
    pub fn new(listener: TcpListener, limits: AdmissionLimits, metrics: Arc<Metrics>) -> Self {
        HttpListener {
            listener,
            admission: Admission::new(limits, metrics),
        }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = AdmittedStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, peer, slots) = self.admission.admit(&self.listener).await;
        let limits = &self.admission.limits;
        let stream = AdmittedStream {
            inner: stream,
            idle: IdleClock::new(
                ActivityKind::Bytes,
                limits.idle_timeout,
                limits.max_lifetime,
            ),
            _slots: slots,
        };
        (stream, peer)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Raises the soft limit on open files to the hard limit, so that the connection limits, not
/// the file descriptors, decide how many clients are served. Returns the new soft limit.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn exhaustion_backs_off_instead_of_spinning() {
        let calls = AtomicUsize::new(0);
        let start = Instant::now();
        let value = accept_with_backoff("test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 5 {
                    Err(io::Error::from_raw_os_error(24)) // EMFILE
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(value, 5);
        // 50 + 100 + 200 + 400 + 800 ms of backoff before the sixth try.
        assert_eq!(start.elapsed(), Duration::from_millis(1550));
    }

    #[tokio::test(start_paused = true)]
    async fn other_accept_errors_retry_at_once() {
        let calls = AtomicUsize::new(0);
        let start = Instant::now();
        accept_with_backoff("test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(io::Error::from(io::ErrorKind::ConnectionAborted))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_and_mapped_ones_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_group(a), address_group(b));
        assert_ne!(address_group(a), address_group(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            address_group(mapped),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        let table = Arc::new(AddressTable::default());
        let _first = table.take(a, 1).unwrap();
        assert!(table.take(b, 1).is_none(), "same /64");
        assert!(table.take(c, 1).is_some());
    }

    #[test]
    fn address_slots_are_counted_and_given_back() {
        let table = Arc::new(AddressTable::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let first = table.take(a, 2).unwrap();
        let _second = table.take(a, 2).unwrap();
        assert!(table.take(a, 2).is_none(), "third from one address");
        assert!(
            table.take(b, 2).is_some(),
            "another address is not affected"
        );
        drop(first);
        assert!(
            table.take(a, 2).is_some(),
            "a closed connection frees its slot"
        );
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut bytes = len.to_be_bytes()[1..].to_vec();
        bytes.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(payload);
        bytes
    }

    #[tokio::test(start_paused = true)]
    async fn pings_do_not_count_as_activity_but_other_frames_do() {
        let mut clock = IdleClock::new(ActivityKind::Http2Frames, Duration::from_secs(10), None);
        clock.saw(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(!clock.used, "the preface alone is not use");
        // A PING split across reads, with a payload that looks like a HEADERS frame header.
        let ping = frame(HTTP2_PING, &[0, 0, 5, 1, 0, 0, 0, 0]);
        clock.saw(&ping[..4]);
        clock.saw(&ping[4..]);
        clock.saw(&frame(0x4, &[])); // an empty SETTINGS
        clock.saw(&frame(0x8, &[0, 0, 1, 0])); // WINDOW_UPDATE
        assert!(!clock.used, "PING, SETTINGS and WINDOW_UPDATE are upkeep");
        let mut bytes = frame(0x1, &[0; 20]); // HEADERS
        bytes.extend(frame(0x0, &[1; 300])); // DATA
        clock.saw(&bytes);
        assert!(std::mem::take(&mut clock.used), "HEADERS");
        // Payload bytes alone are not a new frame.
        let partial = frame(0x0, &[1; 100]);
        clock.saw(&partial[..9]);
        assert!(std::mem::take(&mut clock.used));
        clock.saw(&partial[9..]);
        assert!(!clock.used, "payload");
        // A response the server writes is use; its PINGs and window updates are not.
        clock.wrote(&frame(HTTP2_PING, &[0; 8]));
        assert!(!clock.used);
        clock.wrote(&frame(0x0, &[5; 80]));
        assert!(clock.used, "server DATA");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_and_activity_postpones_it() {
        let mut clock = IdleClock::new(ActivityKind::Bytes, Duration::from_secs(10), None);
        let waker = futures_waker();
        let mut cx = Context::from_waker(&waker);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(clock.poll_expired(&mut cx).is_pending());
        clock.saw(b"x");
        // The timer fires at 10 s, sees the use, and waits a whole timeout from then.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(clock.poll_expired(&mut cx).is_pending(), "used at 6 s");
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(
            clock.poll_expired(&mut cx).is_pending(),
            "21 s: within the timeout of 12 s"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            clock.poll_expired(&mut cx).is_ready(),
            "idle since 6 s, past 12 + 10 s"
        );

        let mut old = IdleClock::new(
            ActivityKind::Bytes,
            Duration::from_secs(10),
            Some(Duration::from_secs(15)),
        );
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(4)).await;
            old.saw(b"x");
        }
        assert!(old.poll_expired(&mut cx).is_ready(), "past its lifetime");
    }

    fn futures_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
