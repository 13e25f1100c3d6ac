//! The server's HTTP side of a run: OCSP posts, and its own CPU and latency read from `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::*;

/// One keep-alive HTTP/1.1 connection to the server's HTTP side.
pub(super) type HttpConnection = SendRequest<Full<Bytes>>;

/// Opens a keep-alive HTTP/1.1 connection to `address` (hyper's client; its connection task
/// ends when the connection closes).
pub(super) async fn http_connect(address: SocketAddr) -> std::io::Result<HttpConnection> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one request and reads its answer's body, at most `limit` bytes.
async fn http_request(
    connection: &mut HttpConnection,
    request: http::Request<Full<Bytes>>,
    limit: usize,
) -> std::io::Result<(http::StatusCode, Bytes)> {
    connection.ready().await.map_err(std::io::Error::other)?;
    let response = connection
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, body))
}

/// A POST of an OCSP request on a kept-alive connection; returns true on a 200 answer.
pub(super) async fn ocsp_post(
    connection: &mut HttpConnection,
    body: Bytes,
) -> std::io::Result<bool> {
    let request = http::Request::post("/ocsp")
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/ocsp-request")
        .body(Full::new(body))
        .map_err(std::io::Error::other)?;
    let (status, _) = http_request(connection, request, 64 << 10).await?;
    Ok(status == http::StatusCode::OK)
}

/// What the bench reads from the server's `/metrics` before and after the measured window.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct ServerReading {
    /// `process_cpu_seconds_total`.
    pub(super) cpu_seconds: Option<f64>,
    /// `payra_certificate_cache_lookups_total`: hits and misses.
    pub(super) cache_lookups: (f64, f64),
    /// Cumulative `payra_rpc_duration_seconds` buckets of one method, summed over its status
    /// codes: (upper bound in seconds, count), in the page's order (ascending, `+Inf` last).
    buckets: Vec<(f64, u64)>,
}

impl ServerReading {
    /// Parses a Prometheus text page for `method`'s latency buckets and the CPU counter.
    fn parse(page: &str, method: Option<&str>) -> ServerReading {
        let mut reading = ServerReading::default();
        for line in page.lines() {
            if let Some(value) = line.strip_prefix("process_cpu_seconds_total ") {
                reading.cpu_seconds = value.trim().parse().ok();
                continue;
            }
            let lookups = |result| {
                line.strip_prefix(&format!(
                    "payra_certificate_cache_lookups_total{{result=\"{result}\"}} "
                ))
                .and_then(|value| value.trim().parse::<f64>().ok())
            };
            if let Some(hits) = lookups("hit") {
                reading.cache_lookups.0 = hits;
                continue;
            }
            if let Some(misses) = lookups("miss") {
                reading.cache_lookups.1 = misses;
                continue;
            }
            let (Some(method), Some(rest)) = (
                method,
                line.strip_prefix("payra_rpc_duration_seconds_bucket{"),
            ) else {
                continue;
            };
            let Some((labels, count)) = parse_labels(rest) else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.as_str())
            };
            if label("method") != Some(method) {
                continue;
            }
            let (Some(le), Ok(count)) = (label("le"), count.trim().parse::<f64>()) else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(le) => le,
                    Err(_) => continue,
                }
            };
            match reading.buckets.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, total)) => *total += count as u64,
                None => reading.buckets.push((le, count as u64)),
            }
        }
        reading
            .buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        reading
    }

    /// The share of certificate cache lookups between `before` and `self` that hit.
    pub(super) fn cache_hit_rate_since(&self, before: &ServerReading) -> Option<f64> {
        let hits = self.cache_lookups.0 - before.cache_lookups.0;
        let misses = self.cache_lookups.1 - before.cache_lookups.1;
        (hits + misses > 0.0).then(|| hits / (hits + misses))
    }

    /// The percentiles of what was observed between `before` and `self`.
    pub(super) fn latency_since(&self, before: &ServerReading) -> Option<ServerLatency> {
        let counts: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .map(|&(le, after)| {
                let earlier = before
                    .buckets
                    .iter()
                    .find(|(bound, _)| *bound == le)
                    .map_or(0, |&(_, count)| count);
                (le, after.saturating_sub(earlier))
            })
            .collect();
        let requests = counts.last().map_or(0, |&(_, count)| count);
        if requests == 0 {
            return None;
        }
        let at_most = |p: f64| {
            let rank = (p * requests as f64).ceil().max(1.0) as u64;
            counts
                .iter()
                .find(|&&(_, count)| count >= rank)
                .and_then(|&(le, _)| le.is_finite().then(|| (le * 1e6).round() as u64))
        };
        Some(ServerLatency {
            requests,
            p50_us: at_most(0.50),
            p90_us: at_most(0.90),
            p99_us: at_most(0.99),
        })
    }
}

/// Splits `name="value",...} rest` (the part of a Prometheus text line after `{`) into its
/// labels, unescaping `\\`, `\"` and `\n` in values, and the rest of the line.
pub(super) fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The RPC whose server-side latency a scenario reports.
pub(super) fn rpc_method(scenario: Scenario, batch: usize) -> Option<&'static str> {
    match scenario {
        Scenario::Verify if batch > 1 => Some("VerifyPayments"),
        Scenario::Verify => Some("VerifyPayment"),
        Scenario::Enroll => Some("Enroll"),
        Scenario::Token => Some("CreateEnrollmentToken"),
        Scenario::Status => Some("GetCertificateStatus"),
        Scenario::Ocsp => None,
    }
}

/// Reads the server's `/metrics` page (at most 4 MiB, within 2 s).
pub(super) async fn server_reading(
    http: SocketAddr,
    method: Option<&str>,
) -> Option<ServerReading> {
    let read = async {
        let mut connection = http_connect(http).await.ok()?;
        let request = http::Request::get("/metrics")
            .header(http::header::HOST, "localhost")
            .body(Full::new(Bytes::new()))
            .ok()?;
        let (status, page) = http_request(&mut connection, request, 4 << 20).await.ok()?;
        if status != http::StatusCode::OK {
            return None;
        }
        Some(ServerReading::parse(
            &String::from_utf8_lossy(&page),
            method,
        ))
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
}

/// CPU used between two readings, in microseconds per request.
pub(super) fn cpu_per_request(
    before: Option<f64>,
    after: Option<f64>,
    requests: u64,
) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if requests > 0 && after >= before => {
            Some((after - before) * 1e6 / requests as f64)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(verify: &[(&str, u64)], cpu: f64) -> String {
        let mut page =
            format!("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n");
        for (le, count) in verify {
            // Two status codes of one method are summed; another method is ignored.
            page.push_str(&format!(
                "payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"VerifyPayment\",le=\"{le}\"}} {count}\n\
                 payra_rpc_duration_seconds_bucket{{code=\"UNAVAILABLE\",method=\"VerifyPayment\",le=\"{le}\"}} 1\n\
                 payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"VerifyPayment,le=\\\"9\\\"\",le=\"{le}\"}} 7\n\
                 payra_rpc_duration_seconds_bucket{{code=\"OK\",method=\"Enroll\",le=\"{le}\"}} 999\n"
            ));
        }
        page
    }

    #[test]
    fn server_latency_comes_from_the_histogram_difference() {
        let before = ServerReading::parse(
            &page(
                &[("0.001", 10), ("0.005", 10), ("0.01", 10), ("+Inf", 10)],
                1.5,
            ),
            Some("VerifyPayment"),
        );
        assert_eq!(before.cpu_seconds, Some(1.5));
        assert_eq!(
            before.buckets,
            vec![(0.001, 11), (0.005, 11), (0.01, 11), (f64::INFINITY, 11)]
        );
        // 100 more: 50 within 1 ms, 40 more within 5 ms, 9 more within 10 ms, 1 beyond.
        let after = ServerReading::parse(
            &page(
                &[("0.001", 60), ("0.005", 100), ("0.01", 109), ("+Inf", 110)],
                2.0,
            ),
            Some("VerifyPayment"),
        );
        assert_eq!(
            after.latency_since(&before),
            Some(ServerLatency {
                requests: 100,
                p50_us: Some(1000),
                p90_us: Some(5000),
                p99_us: Some(10_000),
            })
        );
        // Past the largest finite bucket there is no bound to give.
        let slow = ServerReading::parse(
            &page(
                &[("0.001", 10), ("0.005", 10), ("0.01", 10), ("+Inf", 20)],
                2.0,
            ),
            Some("VerifyPayment"),
        );
        let latency = slow.latency_since(&before).unwrap();
        assert_eq!((latency.requests, latency.p50_us), (10, None));
        // Nothing observed in the window, or no method asked for: no latency.
        assert_eq!(before.latency_since(&before), None);
        let ocsp = ServerReading::parse(&page(&[("+Inf", 5)], 3.0), None);
        assert_eq!((ocsp.cpu_seconds, ocsp.buckets.len()), (Some(3.0), 0));
    }
}
