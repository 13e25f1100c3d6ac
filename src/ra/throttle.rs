//! Resisting enrollment-token guessing: failed token lookups are counted per peer address in
//! a fixed window, and a peer over the limit gets `ResourceExhausted` for its unknown tokens
//! until its window ends. A real token always works: phones behind one carrier NAT address
//! share it, and one guesser must not lock them all out. With 256-bit tokens guessing is
//! hopeless anyway; this keeps the attempts visible and cheap to refuse.

use crate::sync::Unpoisoned;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Most peers tracked at once; the oldest windows are dropped beyond this.
const MAX_TRACKED_PEERS: usize = 100_000;

/// Failure counts per peer address (IPv6: per /64).
pub struct FailureThrottle {
    window_ms: i64,
    max_failures: u32,
    peers: Mutex<Peers>,
}

/// Windows per address group, and until when the table is full.
#[derive(Default)]
struct Peers {
    windows: HashMap<IpAddr, (i64, u32)>,
    /// While the table is full of live windows, new addresses are treated as over the limit
    /// (only unknown tokens are throttled, so real enrollments still pass) rather than
    /// forgetting every address's count.
    saturated_until: i64,
}

impl FailureThrottle {
    /// Allows `max_failures` failures per peer in each window of `window_ms`.
    pub fn new(max_failures: u32, window_ms: i64) -> FailureThrottle {
        FailureThrottle {
            window_ms,
            max_failures,
            peers: Mutex::new(Peers::default()),
        }
    }

    /// When the peer may try again, if it is over the limit at `now_ms`. A limit of 0
    /// switches the throttle off.
    pub fn blocked_until(&self, peer: IpAddr, now_ms: i64) -> Option<i64> {
        if self.max_failures == 0 {
            return None;
        }
        let peer = crate::listener::address_group(peer);
        let peers = self.peers.lock().unpoisoned();
        if now_ms < peers.saturated_until && !peers.windows.contains_key(&peer) {
            return Some(peers.saturated_until);
        }
        match peers.windows.get(&peer) {
            Some((start, count))
                if now_ms < start + self.window_ms && *count >= self.max_failures =>
            {
                Some(start + self.window_ms)
            }
            _ => None,
        }
    }

    /// Counts one failure of `peer` at `now_ms`.
    pub fn record_failure(&self, peer: IpAddr, now_ms: i64) {
        let peer = crate::listener::address_group(peer);
        let mut peers = self.peers.lock().unpoisoned();
        if peers.windows.len() >= MAX_TRACKED_PEERS && !peers.windows.contains_key(&peer) {
            let window_ms = self.window_ms;
            peers
                .windows
                .retain(|_, (start, _)| now_ms < *start + window_ms);
            if peers.windows.len() >= MAX_TRACKED_PEERS {
                peers.saturated_until = now_ms + window_ms;
                return;
            }
        }
        let entry = peers.windows.entry(peer).or_insert((now_ms, 0));
        if now_ms >= entry.0 + self.window_ms {
            *entry = (now_ms, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let throttle = FailureThrottle::new(3, 60_000);
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for i in 0..3 {
            assert_eq!(throttle.blocked_until(peer, 1_000 + i), None);
            throttle.record_failure(peer, 1_000 + i);
        }
        assert_eq!(throttle.blocked_until(peer, 2_000), Some(61_000));
        assert_eq!(throttle.blocked_until(other, 2_000), None, "per peer");
        assert_eq!(throttle.blocked_until(peer, 61_000), None, "window over");
        throttle.record_failure(peer, 61_000);
        assert_eq!(throttle.blocked_until(peer, 61_001), None, "new window");
    }

    #[test]
    fn a_full_table_keeps_every_count_and_holds_new_addresses_back() {
        let throttle = FailureThrottle::new(3, 60_000);
        let first: IpAddr = "10.0.0.0".parse().unwrap();
        for _ in 0..3 {
            throttle.record_failure(first, 1_000);
        }
        for n in 1..MAX_TRACKED_PEERS as u32 {
            throttle.record_failure(IpAddr::V4((0x0a00_0000 + n).into()), 1_000);
        }
        let newcomer: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(throttle.blocked_until(newcomer, 2_000), None);
        throttle.record_failure(newcomer, 2_000);
        assert_eq!(
            throttle.blocked_until(newcomer, 2_000),
            Some(62_000),
            "table full"
        );
        assert_eq!(
            throttle.blocked_until(first, 2_000),
            Some(61_000),
            "a full table forgets no count"
        );
        // IPv6 counts by /64.
        let throttle = FailureThrottle::new(1, 60_000);
        throttle.record_failure("2001:db8::1".parse().unwrap(), 0);
        assert!(throttle
            .blocked_until("2001:db8::2".parse().unwrap(), 1)
            .is_some());
    }

    #[test]
    fn zero_switches_the_throttle_off() {
        let throttle = FailureThrottle::new(0, 60_000);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        for i in 0..100 {
            throttle.record_failure(peer, i);
        }
        assert_eq!(throttle.blocked_until(peer, 100), None);
    }
}
