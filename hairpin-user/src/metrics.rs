//! Prometheus metrics: hairpin's statistics in the text exposition format
//! (version 0.0.4, encoded by prometheus-client), served over HTTP/1.1 by
//! hyper for scrapes: one request per connection, answered and closed.

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use bytes::Bytes;
use hairpin_common::Counter;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{net::TcpListener, task::JoinSet};

use crate::stats::{MappingRow, Snapshot};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The path scrapes are served on.
pub const METRICS_PATH: &str = "/metrics";

/// The exposition of `snapshot` and `mappings`. Every family has its HELP and
/// TYPE lines, even when it has no samples.
pub fn render(snapshot: &Snapshot, mappings: &[MappingRow]) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        snapshot: snapshot.clone(),
        mappings: mappings.to_vec(),
    }));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// One scrape's figures, as the registry's only collector.
#[derive(Debug)]
struct Scrape {
    snapshot: Snapshot,
    mappings: Vec<MappingRow>,
}

/// One of a mapping's figures.
type MappingFigure = fn(&MappingRow) -> u64;

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = &self.snapshot;
        // Counters are named without `_total`: the encoder adds it.
        let mut family = encoder.encode_descriptor(
            "hairpin_packets",
            "Datapath events by counter (packet verdicts and flow events), summed over the CPUs.",
            None,
            MetricType::Counter,
        )?;
        for &counter in Counter::ALL.iter().filter(|c| c.is_datapath()) {
            let labels = [("verdict", counter.name())];
            ConstCounter::new(snapshot.counter(counter)).encode(family.encode_family(&labels)?)?;
        }

        let tables = [("established", snapshot.established_entries), ("new", snapshot.new_entries)];
        let mut family = encoder.encode_descriptor(
            "hairpin_conntrack_entries",
            "Entries in a conntrack table, two per flow.",
            None,
            MetricType::Gauge,
        )?;
        for (table, entries) in tables {
            ConstGauge::new(entries as u64).encode(family.encode_family(&[("table", table)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hairpin_conntrack_capacity",
            "Capacity of a conntrack table, in entries.",
            None,
            MetricType::Gauge,
        )?;
        for (table, _) in tables {
            ConstGauge::new(snapshot.capacity)
                .encode(family.encode_family(&[("table", table)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "hairpin_conntrack_fill_ratio",
            "Entries over capacity of a conntrack table (0 when the capacity is 0).",
            None,
            MetricType::Gauge,
        )?;
        for (table, entries) in tables {
            let ratio = fill_ratio(entries, snapshot.capacity);
            ConstGauge::new(ratio).encode(family.encode_family(&[("table", table)])?)?;
        }

        let totals = [
            (
                "hairpin_new_flows_evicted",
                "New flows evicted from the new-flow table by its LRU before being established or expiring.",
                snapshot.new_flows_evicted(),
            ),
            (
                "hairpin_reclaimed_entries",
                "Conntrack entries of expired flows removed by user space.",
                snapshot.reclaimed_established + snapshot.reclaimed_new,
            ),
            (
                "hairpin_port_alloc_failures",
                "New flows refused for want of a free SNAT source port.",
                snapshot.counter(Counter::PortAllocFailed),
            ),
        ];
        for (name, help, value) in totals {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(family)?;
        }

        let per_mapping: [(&str, &str, MappingFigure); 3] = [
            ("hairpin_mapping_flows", "Flows opened through a mapping.", |m| m.flows),
            ("hairpin_mapping_packets", "Packets translated for a mapping.", |m| m.packets),
            ("hairpin_mapping_bytes", "Bytes translated for a mapping.", |m| m.bytes),
        ];
        for (name, help, value) in per_mapping {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for mapping in &self.mappings {
                let labels = [
                    ("proto", mapping.proto.as_str()),
                    ("public", mapping.public.as_str()),
                    ("to", mapping.to.as_str()),
                ];
                ConstCounter::new(value(mapping)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn fill_ratio(entries: usize, capacity: u32) -> f64 {
    if capacity == 0 { 0.0 } else { entries as f64 / f64::from(capacity) }
}

/// Request heads longer than this are refused (hyper's smallest buffer).
const HEAD_LIMIT: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may last in all: its head, the scrape and the
/// response taken.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections handled at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

/// Serves GET (and HEAD) `/metrics` on `listener`, calling `collect` (on
/// tokio's blocking pool) for each scrape; other paths get 404, other
/// methods 405, malformed requests 400, and a `collect` error 500 with its
/// message. Runs until the future is dropped, which also drops the
/// connections in flight; returns only on an error that leaves the listener
/// unusable.
pub async fn serve<F>(listener: TcpListener, collect: F) -> io::Result<()>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    serve_with(listener, Arc::new(collect), HEAD_TIMEOUT).await
}

async fn serve_with<F>(
    listener: TcpListener,
    collect: Arc<F>,
    head_timeout: Duration,
) -> io::Result<()>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            connections.join_next().await;
            continue;
        }
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) if accept_error_is_fatal(&error) => return Err(error),
            Err(error) => {
                debug!("metrics: accept: {error}");
                if accept_error_is_exhaustion(&error) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let collect = Arc::clone(&collect);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let collect = Arc::clone(&collect);
                async move { Ok::<_, Infallible>(respond(&request, collect).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout)
                .max_buf_size(HEAD_LIMIT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!("metrics: {peer}: {error}"),
                Err(_) => debug!("metrics: {peer}: connection timed out"),
            }
        });
    }
}

/// Errors of the listener itself, as opposed to those of one pending
/// connection (which Linux reports through `accept` too).
fn accept_error_is_fatal(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EBADF | libc::EFAULT | libc::EINVAL | libc::ENOTSOCK))
}

fn accept_error_is_exhaustion(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

async fn respond<B, F>(request: &Request<B>, collect: Arc<F>) -> Response<Full<Bytes>>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    if request.uri().path() != METRICS_PATH {
        return error(StatusCode::NOT_FOUND, "not found; metrics are at /metrics");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD are allowed");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // hyper leaves the body out of a HEAD response, its length kept.
    match tokio::task::spawn_blocking(move || collect()).await {
        Ok(Ok(text)) => reply(StatusCode::OK, CONTENT_TYPE, text),
        Ok(Err(message)) => {
            warn!("metrics: collecting the statistics failed: {message}");
            error(StatusCode::INTERNAL_SERVER_ERROR, &message)
        }
        Err(join_error) => {
            warn!("metrics: collecting the statistics failed: {join_error}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "collecting the statistics failed")
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::SocketAddr;

    use rstest::rstest;

    use super::*;

    /// Whether `name` matches `pattern`, a PromQL regex of literals and `.*`.
    fn matches(pattern: &str, name: &str) -> bool {
        match pattern.split_once(".*") {
            None => pattern == name,
            Some((head, tail)) => {
                name.starts_with(head)
                    && (head.len()..=name.len()).any(|i| matches(tail, &name[i..]))
            }
        }
    }

    /// The dashboard in examples/ asks only for metrics this exposition has
    /// and for verdicts that are counters: a renamed metric or counter
    /// fails here, not as an empty panel on an operator's screen.
    #[test]
    fn the_grafana_dashboard_asks_for_what_the_exposition_has() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/grafana-dashboard.json");
        let text = std::fs::read_to_string(path).expect("read the dashboard");
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).expect("the dashboard is JSON");
        let mut exprs = Vec::new();
        let mut stack = vec![&dashboard];
        while let Some(value) = stack.pop() {
            match value {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                        exprs.push(expr.clone());
                    }
                    stack.extend(map.values());
                }
                serde_json::Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
        assert!(exprs.len() >= 10, "the dashboard's panels have queries: {exprs:?}");
        let exposition = render(&Snapshot::default(), &[]);
        let names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("hairpin_") {
                let metric: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                assert!(
                    exposition.contains(&format!("# TYPE {metric} ")),
                    "the dashboard asks for {metric}, which /metrics does not have: {expr}"
                );
                rest = &rest[at + metric.len()..];
            }
            for (operator, is_regex) in [("verdict=\"", false), ("verdict=~\"", true)] {
                let mut rest = expr.as_str();
                while let Some(at) = rest.find(operator) {
                    let value = &rest[at + operator.len()..];
                    let value = &value[..value.find('"').expect("a closed label value")];
                    let alternatives: Vec<&str> =
                        if is_regex { value.split('|').collect() } else { vec![value] };
                    for alternative in alternatives {
                        assert!(
                            names.iter().any(|name| matches(alternative, name)),
                            "the dashboard's verdict {alternative:?} is no counter: {expr}"
                        );
                    }
                    rest = &rest[at + operator.len()..];
                }
            }
        }
    }

    /// The samples of an exposition, read by prometheus-parse as a
    /// scraper reads them; every line must be one it understands.
    fn parse_exposition(text: &str) -> Vec<prometheus_parse::Sample> {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("a readable exposition");
        let samples = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
        assert_eq!(scrape.samples.len(), samples, "every sample line parses:\n{text}");
        scrape.samples
    }

    fn value_of(sample: &prometheus_parse::Sample) -> f64 {
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{} is no plain value: {other:?}", sample.metric),
        }
    }

    /// The one sample of `name` with exactly `labels`.
    fn find<'a>(
        samples: &'a [prometheus_parse::Sample],
        name: &str,
        labels: &[(&str, &str)],
    ) -> &'a prometheus_parse::Sample {
        let found: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .collect();
        assert_eq!(found.len(), 1, "one sample {name}{labels:?} in {samples:?}");
        found[0]
    }

    fn mapping(proto: &str, public: &str, to: &str, traffic: u64) -> MappingRow {
        MappingRow {
            proto: proto.into(),
            public: public.into(),
            to: to.into(),
            flows: traffic,
            packets: traffic * 10,
            bytes: traffic * 1000,
            ..Default::default()
        }
    }

    fn busy_snapshot() -> Snapshot {
        Snapshot {
            counters: vec![
                (Counter::Hairpinned, 1234),
                (Counter::FlowCreated, 100),
                (Counter::FlowEstablished, 10),
                (Counter::FlowExpired, 5),
                (Counter::PortAllocFailed, 7),
            ],
            established_entries: 30,
            new_entries: 40,
            capacity: 80,
            reclaimed_established: 4,
            reclaimed_new: 10,
        }
    }

    #[test]
    fn render_is_valid_exposition_with_every_figure() {
        let mappings = [
            mapping("tcp", "203.0.113.1:80", "192.168.0.2:80", 3),
            mapping("udp", "203.0.113.1:8000-8099", "192.168.0.2:9000-9099", 5),
        ];
        let snapshot = busy_snapshot();
        let text = render(&snapshot, &mappings);
        let samples = parse_exposition(&text);
        let value = |name, labels: &[(&str, &str)]| value_of(find(&samples, name, labels));

        assert_eq!(value("hairpin_packets_total", &[("verdict", "hairpinned")]), 1234.0);
        assert_eq!(value("hairpin_packets_total", &[("verdict", "port_alloc_failed")]), 7.0);
        for (table, entries) in [("established", 30.0), ("new", 40.0)] {
            assert_eq!(value("hairpin_conntrack_entries", &[("table", table)]), entries);
            assert_eq!(value("hairpin_conntrack_capacity", &[("table", table)]), 80.0);
            assert_eq!(value("hairpin_conntrack_fill_ratio", &[("table", table)]), entries / 80.0);
        }
        assert_eq!(
            value("hairpin_new_flows_evicted_total", &[]),
            snapshot.new_flows_evicted() as f64
        );
        assert_eq!(value("hairpin_reclaimed_entries_total", &[]), 14.0);
        assert_eq!(value("hairpin_port_alloc_failures_total", &[]), 7.0);
        let udp = [
            ("proto", "udp"),
            ("public", "203.0.113.1:8000-8099"),
            ("to", "192.168.0.2:9000-9099"),
        ];
        assert_eq!(value("hairpin_mapping_flows_total", &udp), 5.0);
        assert_eq!(value("hairpin_mapping_packets_total", &udp), 50.0);
        assert_eq!(value("hairpin_mapping_bytes_total", &udp), 5000.0);
        let tcp = [("proto", "tcp"), ("public", "203.0.113.1:80"), ("to", "192.168.0.2:80")];
        assert_eq!(value("hairpin_mapping_bytes_total", &tcp), 3000.0);
        assert!(text.contains("# TYPE hairpin_conntrack_fill_ratio gauge\n"), "{text}");
        assert!(text.contains("# TYPE hairpin_mapping_bytes_total counter\n"), "{text}");
    }

    #[test]
    fn every_counter_is_exposed_zero_included() {
        let text = render(&Snapshot::default(), &[]);
        let samples = parse_exposition(&text);
        let verdicts: Vec<_> =
            samples.iter().filter(|s| s.metric == "hairpin_packets_total").collect();
        let datapath: Vec<_> = Counter::ALL.iter().filter(|c| c.is_datapath()).collect();
        assert_eq!(verdicts.len(), datapath.len(), "{text}");
        for counter in datapath {
            let sample = find(&samples, "hairpin_packets_total", &[("verdict", counter.name())]);
            assert_eq!(value_of(sample), 0.0);
        }
        // Families without samples are still declared.
        assert!(text.contains("# TYPE hairpin_mapping_flows_total counter\n"), "{text}");
        assert_eq!(
            value_of(find(&samples, "hairpin_conntrack_fill_ratio", &[("table", "new")])),
            0.0
        );
    }

    #[rstest]
    #[case::plain("192.168.0.2:80", "192.168.0.2:80")]
    #[case::quote(r#"a"b"#, r#"a\"b"#)]
    #[case::backslash(r"a\b", r"a\\b")]
    #[case::newline("a\nb", r"a\nb")]
    #[case::all_at_once("\\\"\n", r#"\\\"\n"#)]
    #[case::unicode("serveur-é", "serveur-é")]
    fn label_values_are_escaped(#[case] to: &str, #[case] escaped: &str) {
        let text = render(&Snapshot::default(), &[mapping("tcp", "203.0.113.1:80", to, 1)]);
        let expected = format!(
            "hairpin_mapping_flows_total{{proto=\"tcp\",public=\"203.0.113.1:80\",to=\"{escaped}\"}} 1\n"
        );
        assert!(text.contains(&expected), "{text}");
    }

    #[rstest]
    #[case(0, 0, 0.0)]
    #[case(0, 65536, 0.0)]
    #[case(32768, 65536, 0.5)]
    #[case(65536, 65536, 1.0)]
    #[case(5, 0, 0.0)]
    fn fill_ratio_is_entries_over_capacity(
        #[case] entries: usize,
        #[case] capacity: u32,
        #[case] ratio: f64,
    ) {
        assert_eq!(fill_ratio(entries, capacity), ratio);
    }

    /// A server on a loopback port, with a short head timeout.
    async fn start<F>(
        collect: F,
        head_timeout: Duration,
    ) -> (SocketAddr, tokio::task::JoinHandle<io::Result<()>>)
    where
        F: Fn() -> Result<String, String> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("local address");
        (address, tokio::spawn(serve_with(listener, Arc::new(collect), head_timeout)))
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// Sends `request` from a blocking std client and reads the reply until
    /// the server closes.
    async fn exchange(address: SocketAddr, request: &[u8]) -> Reply {
        let request = request.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(address).expect("connect");
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            stream.write_all(&request).expect("send the request");
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).expect("read the reply");
            let text = String::from_utf8(bytes).expect("UTF-8 reply");
            if text.is_empty() {
                // Closed without an answer.
                return Reply { status: 0, headers: Vec::new(), body: String::new() };
            }
            let (head, body) = text.split_once("\r\n\r\n").expect("a reply head");
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            let status = ["HTTP/1.1 ", "HTTP/1.0 "]
                .iter()
                .find_map(|version| status_line.strip_prefix(version))
                .and_then(|s| s[..3].parse().ok())
                .unwrap_or_else(|| panic!("status line {status_line:?}"));
            let headers = lines
                .map(|l| l.split_once(": ").expect("header"))
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            let reply = Reply { status, headers, body: body.to_owned() };
            if let Some(length) = reply.header("Content-Length") {
                let length: usize = length.parse().unwrap();
                assert!(length == reply.body.len() || reply.body.is_empty(), "{reply:?}");
            }
            reply
        })
        .await
        .expect("client task")
    }

    fn rendered() -> Result<String, String> {
        Ok(render(&busy_snapshot(), &[mapping("tcp", "203.0.113.1:80", "192.168.0.2:80", 1)]))
    }

    #[tokio::test]
    async fn serves_the_metrics_to_a_get() {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n";
        let reply = exchange(address, request).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("Content-Type"), Some(CONTENT_TYPE));
        assert_eq!(reply.header("Connection"), Some("close"));
        assert_eq!(reply.header("Content-Length"), Some(&*reply.body.len().to_string()));
        assert_eq!(reply.body, rendered().unwrap());
        parse_exposition(&reply.body);
    }

    #[rstest]
    #[case::query(b"GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 200)]
    #[case::http_1_0_bare_lf(b"GET /metrics HTTP/1.0\n\n", 200)]
    #[case::other_path(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", 404)]
    #[case::root(b"GET / HTTP/1.1\r\n\r\n", 404)]
    #[case::post(b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 405)]
    #[case::lowercase_method(b"get /metrics HTTP/1.1\r\n\r\n", 405)]
    #[case::garbage(b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n", 400)]
    #[case::no_version(b"GET /metrics\r\n\r\n", 400)]
    #[case::bad_header(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400)]
    // Only HTTP/1 is served: hyper closes on the HTTP/2 preface.
    #[case::http2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0)]
    #[tokio::test]
    async fn answers_each_request_with_its_status(#[case] request: &[u8], #[case] status: u16) {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let reply = exchange(address, request).await;
        assert_eq!(reply.status, status, "{reply:?}");
        if status == 0 {
            return;
        }
        // An HTTP/1.0 connection closes unless told otherwise.
        let http_1_0 = request.windows(8).any(|w| w == b"HTTP/1.0");
        assert!(http_1_0 || reply.header("Connection") == Some("close"), "{reply:?}");
        if status == 405 {
            assert_eq!(reply.header("Allow"), Some("GET, HEAD"));
        }
        // The 400s are hyper's own; what the server answers says why.
        if matches!(status, 404 | 405) {
            assert_eq!(reply.header("Content-Type"), Some("text/plain; charset=utf-8"));
            assert!(!reply.body.is_empty());
        }
    }

    #[tokio::test]
    async fn head_gets_the_length_without_the_body() {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let reply = exchange(address, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "");
        assert_eq!(reply.header("Content-Length"), Some(&*rendered().unwrap().len().to_string()));
    }

    #[tokio::test]
    async fn a_collect_error_is_a_500_with_its_message() {
        let (address, _server) =
            start(|| Err("reading the counters: EPERM".into()), HEAD_TIMEOUT).await;
        let reply = exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(reply.status, 500, "{reply:?}");
        assert_eq!(reply.body, "reading the counters: EPERM\n");
    }

    #[tokio::test]
    async fn a_panicking_collect_is_a_500_and_the_server_goes_on() {
        let (address, _server) =
            start(|| panic!("collect panicked on purpose"), HEAD_TIMEOUT).await;
        for _ in 0..2 {
            let reply = exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n").await;
            assert_eq!(reply.status, 500, "{reply:?}");
        }
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
        request.resize(4 * HEAD_LIMIT, b'a');
        let reply = exchange(address, &request).await;
        assert_eq!(reply.status, 431, "{reply:?}");
    }

    #[tokio::test]
    async fn a_slow_head_is_cut_off() {
        let (address, _server) = start(rendered, Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let reply = exchange(address, b"GET /metrics HTTP/1.1\r\nHost:").await;
        assert_eq!(reply.status, 0, "closed without an answer: {reply:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_idle_connection_does_not_block_a_scrape() {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let idle = tokio::net::TcpStream::connect(address).await.expect("connect");
        let reply = exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        drop(idle);
    }

    #[tokio::test]
    async fn dropping_the_server_drops_its_connections() {
        let (address, server) = start(rendered, Duration::from_secs(60)).await;
        let mut idle = std::net::TcpStream::connect(address).expect("connect");
        // Connections are accepted in order: once this one is answered, the
        // idle one has its task.
        assert_eq!(exchange(address, b"GET /metrics HTTP/1.1\r\n\r\n").await.status, 200);
        server.abort();
        assert!(server.await.expect_err("aborted").is_cancelled());
        let started = std::time::Instant::now();
        let bytes = tokio::task::spawn_blocking(move || {
            idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut bytes = Vec::new();
            // EOF or a reset, long before the head timeout of a minute.
            let _ = idle.read_to_end(&mut bytes);
            bytes
        })
        .await
        .expect("client task");
        assert!(bytes.is_empty());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
