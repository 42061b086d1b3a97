//! Prometheus metrics: hairpin's statistics in the text exposition format
//! (version 0.0.4), and a small HTTP server for scrapes.
//!
//! The server speaks just enough HTTP/1.1 for a scraper: one request per
//! connection, answered and closed. It needs nothing from tokio beyond the
//! `net`, `rt` and `time` features.

use std::fmt::{Display, Write as _};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hairpin_common::Counter;
use log::{debug, warn};
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::stats::Snapshot;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The path scrapes are served on.
pub const METRICS_PATH: &str = "/metrics";

/// Per-mapping traffic, for the per-mapping metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappingTraffic {
    /// `"tcp"` or `"udp"`.
    pub proto: String,
    /// The published address and port (or port range), e.g. `"203.0.113.1:80"`.
    pub public: String,
    /// The server's address and port (or port range).
    pub to: String,
    /// Flows opened through the mapping.
    pub flows: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// The exposition of `snapshot` and `mappings`. Every family has its HELP and
/// TYPE lines, even when it has no samples.
pub fn render(snapshot: &Snapshot, mappings: &[MappingTraffic]) -> String {
    let mut out = Exposition::default();

    out.family(
        "hairpin_packets_total",
        Kind::Counter,
        "Datapath events by counter (packet verdicts and flow events), summed over the CPUs.",
    );
    for &counter in Counter::ALL.iter().filter(|c| c.is_datapath()) {
        out.sample(
            "hairpin_packets_total",
            &[("verdict", counter.name())],
            snapshot.counter(counter),
        );
    }

    let tables = [("established", snapshot.established_entries), ("new", snapshot.new_entries)];
    out.family(
        "hairpin_conntrack_entries",
        Kind::Gauge,
        "Entries in a conntrack table, two per flow.",
    );
    for (table, entries) in tables {
        out.sample("hairpin_conntrack_entries", &[("table", table)], entries);
    }
    out.family(
        "hairpin_conntrack_capacity",
        Kind::Gauge,
        "Capacity of a conntrack table, in entries.",
    );
    for (table, _) in tables {
        out.sample("hairpin_conntrack_capacity", &[("table", table)], snapshot.capacity);
    }
    out.family(
        "hairpin_conntrack_fill_ratio",
        Kind::Gauge,
        "Entries over capacity of a conntrack table (0 when the capacity is 0).",
    );
    for (table, entries) in tables {
        let ratio = fill_ratio(entries, snapshot.capacity);
        out.sample("hairpin_conntrack_fill_ratio", &[("table", table)], Float(ratio));
    }

    out.family(
        "hairpin_new_flows_evicted_total",
        Kind::Counter,
        "New flows evicted from the new-flow table by its LRU before being established or expiring.",
    );
    out.sample("hairpin_new_flows_evicted_total", &[], snapshot.new_flows_evicted());
    out.family(
        "hairpin_reclaimed_entries_total",
        Kind::Counter,
        "Conntrack entries of expired flows removed by user space.",
    );
    let reclaimed = snapshot.reclaimed_established + snapshot.reclaimed_new;
    out.sample("hairpin_reclaimed_entries_total", &[], reclaimed);
    out.family(
        "hairpin_port_alloc_failures_total",
        Kind::Counter,
        "New flows refused for want of a free SNAT source port.",
    );
    let port_alloc_failures = snapshot.counter(Counter::PortAllocFailed);
    out.sample("hairpin_port_alloc_failures_total", &[], port_alloc_failures);

    let per_mapping: [(&str, &str, MappingFigure); 3] = [
        ("hairpin_mapping_flows_total", "Flows opened through a mapping.", |m| m.flows),
        ("hairpin_mapping_packets_total", "Packets translated for a mapping.", |m| m.packets),
        ("hairpin_mapping_bytes_total", "Bytes translated for a mapping.", |m| m.bytes),
    ];
    for (name, help, value) in per_mapping {
        out.family(name, Kind::Counter, help);
        for mapping in mappings {
            let labels =
                [("proto", &*mapping.proto), ("public", &*mapping.public), ("to", &*mapping.to)];
            out.sample(name, &labels, value(mapping));
        }
    }

    out.text
}

/// One of a mapping's figures.
type MappingFigure = fn(&MappingTraffic) -> u64;

fn fill_ratio(entries: usize, capacity: u32) -> f64 {
    if capacity == 0 { 0.0 } else { entries as f64 / f64::from(capacity) }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    /// `help` is static text: no backslash or newline to escape.
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                self.text.push_str(label);
                self.text.push_str("=\"");
                escape_label_value(value, &mut self.text);
                self.text.push('"');
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// The exposition format's escapes for label values: backslash, double
/// quote and line feed.
fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
}

/// A float as the exposition format spells it (`NaN`, `+Inf`, `-Inf`);
/// Rust's `Display` never uses an exponent, which the format also accepts.
struct Float(f64);

impl Display for Float {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            f64::INFINITY => f.write_str("+Inf"),
            f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}

/// Request heads longer than this are refused.
const HEAD_LIMIT: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the response, how long and how much of what the client still sends
/// is read and dropped, so that closing does not reset the connection (and
/// lose the response) while unread bytes are pending.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_LIMIT: usize = 64 * 1024;
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
            if let Err(error) = handle_connection(stream, collect, head_timeout).await {
                debug!("metrics: {peer}: {error}");
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

async fn handle_connection<F>(
    mut stream: TcpStream,
    collect: Arc<F>,
    head_timeout: Duration,
) -> io::Result<()>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let response = match tokio::time::timeout(head_timeout, read_head(&stream)).await {
        Err(_) => Response::error(Status::RequestTimeout, "request head not received in time"),
        Ok(head) => match head? {
            Head::Closed => return Ok(()),
            Head::Truncated => Response::error(Status::BadRequest, "incomplete request head"),
            Head::TooLarge => Response::error(Status::HeadTooLarge, "request head too large"),
            Head::Complete(head) => respond(&head, collect).await,
        },
    };
    let send = async {
        write_all(&stream, &response).await?;
        poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await?;
        linger(&stream).await;
        Ok(())
    };
    tokio::time::timeout(WRITE_TIMEOUT, send)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "response not taken")))
}

enum Head {
    /// The bytes up to and including the empty line.
    Complete(Vec<u8>),
    /// Closed by the client before it sent anything.
    Closed,
    /// Closed by the client in the middle of the head.
    Truncated,
    TooLarge,
}

async fn read_head(stream: &TcpStream) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0; 1024];
    loop {
        stream.readable().await?;
        let read = match stream.try_read(&mut chunk) {
            Ok(0) if head.is_empty() => return Ok(Head::Closed),
            Ok(0) => return Ok(Head::Truncated),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        // The end may straddle two reads: look again at the last bytes.
        let scan_from = head.len().saturating_sub(2);
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = head_end(&head[scan_from..]).map(|end| scan_from + end) {
            if end > HEAD_LIMIT {
                return Ok(Head::TooLarge);
            }
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() >= HEAD_LIMIT {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where the head ends: after its empty line, lines ending in CRLF or in a
/// bare LF (which RFC 9112 lets a server accept).
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.iter().enumerate().find_map(|(index, &byte)| match (byte, &bytes[index + 1..]) {
        (b'\n', [b'\n', ..]) => Some(index + 2),
        (b'\n', [b'\r', b'\n', ..]) => Some(index + 3),
        _ => None,
    })
}

#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    target: &'a str,
}

/// The request line of `head`, when `head` is a well-formed HTTP/1.x head.
fn parse_head(head: &[u8]) -> Option<Request<'_>> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split('\n').map(|line| line.strip_suffix('\r').unwrap_or(line));
    let mut request_line = lines.next()?.split(' ');
    let (method, target, version) =
        (request_line.next()?, request_line.next()?, request_line.next()?);
    let well_formed = request_line.next().is_none()
        && is_token(method)
        && target.starts_with('/')
        && target.bytes().all(|byte| byte.is_ascii_graphic())
        && matches!(version, "HTTP/1.0" | "HTTP/1.1")
        && lines.filter(|line| !line.is_empty()).all(|field| {
            field.split_once(':').is_some_and(|(name, value)| {
                is_token(name)
                    && !value.bytes().any(|byte| byte.is_ascii_control() && byte != b'\t')
            })
        });
    well_formed.then_some(Request { method, target })
}

/// An RFC 9110 token: a method or a field name.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

async fn respond<F>(head: &[u8], collect: Arc<F>) -> Vec<u8>
where
    F: Fn() -> Result<String, String> + Send + Sync + 'static,
{
    let Some(request) = parse_head(head) else {
        return Response::error(Status::BadRequest, "malformed request");
    };
    let path = request.target.split_once('?').map_or(request.target, |(path, _)| path);
    if path != METRICS_PATH {
        return Response::error(Status::NotFound, "not found; metrics are at /metrics");
    }
    let with_body = match request.method {
        "GET" => true,
        "HEAD" => false,
        _ => return Response::error(Status::MethodNotAllowed, "only GET and HEAD are allowed"),
    };
    match tokio::task::spawn_blocking(move || collect()).await {
        Ok(Ok(text)) => Response::build(Status::Ok, CONTENT_TYPE, &text, with_body),
        Ok(Err(message)) => {
            warn!("metrics: collecting the statistics failed: {message}");
            Response::error(Status::InternalError, &message)
        }
        Err(error) => {
            warn!("metrics: collecting the statistics failed: {error}");
            Response::error(Status::InternalError, "collecting the statistics failed")
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    HeadTooLarge,
    InternalError,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::RequestTimeout => "408 Request Timeout",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::InternalError => "500 Internal Server Error",
        }
    }
}

struct Response;

impl Response {
    fn build(status: Status, content_type: &str, body: &str, with_body: bool) -> Vec<u8> {
        let allow = match status {
            Status::MethodNotAllowed => "Allow: GET, HEAD\r\n",
            _ => "",
        };
        let mut response = format!(
            "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            status.line(),
            body.len(),
        )
        .into_bytes();
        if with_body {
            response.extend_from_slice(body.as_bytes());
        }
        response
    }

    fn error(status: Status, message: &str) -> Vec<u8> {
        Response::build(status, "text/plain; charset=utf-8", &format!("{message}\n"), true)
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.writable().await?;
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads and drops what the client still sends, until it closes, for at most
/// [`LINGER_TIME`] and [`LINGER_LIMIT`] bytes.
async fn linger(stream: &TcpStream) {
    let drain = async {
        let mut sink = [0; 1024];
        let mut drained = 0;
        while drained < LINGER_LIMIT {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(read) => drained += read,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
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

    /// One sample line, label values unescaped.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// Checks `text` line by line against the text exposition format 0.0.4
    /// and returns its samples. Stricter than the format where hairpin's
    /// output should be: every family has HELP and TYPE before its samples,
    /// its samples are contiguous, counters end in `_total`, no blank lines.
    fn parse_exposition(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "the last line must end in a line feed");
        let mut helps = HashSet::new();
        let mut types = HashMap::new();
        let mut finished_families = HashSet::new();
        let mut current_family: Option<String> = None;
        let mut series = HashSet::new();
        let mut samples = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let at = format!("line {}: {line:?}", index + 1);
            assert!(!line.is_empty(), "{at}: blank line");
            if let Some(comment) = line.strip_prefix("# ") {
                let (keyword, rest) = comment.split_once(' ').expect(&at);
                let (name, rest) = rest.split_once(' ').expect(&at);
                assert!(is_metric_name(name), "{at}: bad metric name");
                assert!(name.starts_with("hairpin_"), "{at}: not a hairpin metric");
                assert!(!samples.iter().any(|s: &Sample| s.name == name), "{at}: after samples");
                match keyword {
                    "HELP" => {
                        assert!(!rest.is_empty(), "{at}: empty help");
                        assert!(!rest.contains('\\'), "{at}: unescaped backslash");
                        assert!(helps.insert(name.to_owned()), "{at}: second HELP");
                    }
                    "TYPE" => {
                        assert!(helps.contains(name), "{at}: TYPE without HELP");
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest),
                            "{at}: unknown type"
                        );
                        assert!(
                            rest != "counter" || name.ends_with("_total"),
                            "{at}: counter name"
                        );
                        assert!(types.insert(name.to_owned(), rest.to_owned()).is_none(), "{at}");
                    }
                    _ => panic!("{at}: unknown comment"),
                }
                continue;
            }
            assert!(!line.starts_with('#'), "{at}: stray comment");
            let sample = parse_sample(line).unwrap_or_else(|error| panic!("{at}: {error}"));
            assert!(types.contains_key(&sample.name), "{at}: sample before its TYPE line");
            if current_family.as_deref() != Some(&sample.name) {
                assert!(!finished_families.contains(&sample.name), "{at}: family split");
                finished_families.extend(current_family.replace(sample.name.clone()));
            }
            let mut key = sample.labels.clone();
            key.sort();
            assert!(series.insert((sample.name.clone(), key)), "{at}: duplicate series");
            samples.push(sample);
        }
        samples
    }

    fn is_metric_name(name: &str) -> bool {
        let mut bytes = name.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    }

    fn is_label_name(name: &str) -> bool {
        let mut bytes = name.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after_brace) = rest.strip_prefix('{') {
            rest = after_brace;
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (label, after) = rest.split_once("=\"").ok_or("label without =\"")?;
                if !is_label_name(label) || label.starts_with("__") {
                    return Err(format!("bad label name {label:?}"));
                }
                if labels.iter().any(|(l, _)| l == label) {
                    return Err(format!("label {label} twice"));
                }
                let mut value = String::new();
                let mut chars = after.char_indices();
                let closing = loop {
                    match chars.next().ok_or("unterminated label value")? {
                        (index, '"') => break index,
                        (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            other => return Err(format!("unknown escape \\{other}")),
                        },
                        (_, c) => value.push(c),
                    }
                };
                labels.push((label.to_owned(), value));
                rest = &after[closing + 1..];
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else if !rest.starts_with('}') {
                    return Err("labels not separated by commas".into());
                }
            }
        }
        let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
        let mut fields = rest.split(' ');
        let value = match fields.next().ok_or("no value")? {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number if number.bytes().all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b)) => {
                number.parse().map_err(|_| format!("bad value {number:?}"))?
            }
            other => return Err(format!("bad value {other:?}")),
        };
        if let Some(timestamp) = fields.next() {
            timestamp.parse::<i64>().map_err(|_| format!("bad timestamp {timestamp:?}"))?;
        }
        if fields.next().is_some() {
            return Err("trailing fields".into());
        }
        Ok(Sample { name: name.to_owned(), labels, value })
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(l, v)| s.labels.iter().any(|(sl, sv)| sl == l && sv == v))
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    fn mapping(proto: &str, public: &str, to: &str, traffic: u64) -> MappingTraffic {
        MappingTraffic {
            proto: proto.into(),
            public: public.into(),
            to: to.into(),
            flows: traffic,
            packets: traffic * 10,
            bytes: traffic * 1000,
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
        let value = |name, labels: &[(&str, &str)]| find(&samples, name, labels).value;

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
            samples.iter().filter(|s| s.name == "hairpin_packets_total").collect();
        let datapath: Vec<_> = Counter::ALL.iter().filter(|c| c.is_datapath()).collect();
        assert_eq!(verdicts.len(), datapath.len(), "{text}");
        for counter in datapath {
            assert_eq!(
                find(&samples, "hairpin_packets_total", &[("verdict", counter.name())]).value,
                0.0
            );
        }
        // Families without samples are still declared.
        assert!(text.contains("# TYPE hairpin_mapping_flows_total counter\n"), "{text}");
        assert_eq!(find(&samples, "hairpin_conntrack_fill_ratio", &[("table", "new")]).value, 0.0);
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
        let samples = parse_exposition(&text);
        let sample = find(
            &samples,
            "hairpin_mapping_packets_total",
            &[("proto", "tcp"), ("public", "203.0.113.1:80"), ("to", to)],
        );
        assert_eq!(sample.value, 10.0);
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

    #[rstest]
    #[case(0.5, "0.5")]
    #[case(1.0, "1")]
    #[case(1e-7, "0.0000001")]
    #[case(f64::NAN, "NaN")]
    #[case(f64::INFINITY, "+Inf")]
    #[case(f64::NEG_INFINITY, "-Inf")]
    fn floats_are_spelled_as_the_format_wants(#[case] value: f64, #[case] spelled: &str) {
        assert_eq!(Float(value).to_string(), spelled);
    }

    #[rstest]
    #[case(b"GET / HTTP/1.1\r\n\r\n", Some(18))]
    #[case(b"GET / HTTP/1.1\n\nrest", Some(16))]
    #[case(b"GET / HTTP/1.1\r\nHost: x\r\n", None)]
    #[case(b"", None)]
    #[case(b"\n", None)]
    fn head_ends_after_the_empty_line(#[case] bytes: &[u8], #[case] end: Option<usize>) {
        assert_eq!(head_end(bytes), end);
    }

    #[rstest]
    #[case(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", Some(("GET", "/metrics")))]
    #[case(b"HEAD /metrics?x=1 HTTP/1.0\n\n", Some(("HEAD", "/metrics?x=1")))]
    #[case(b"GET /metrics HTTP/2.0\r\n\r\n", None)]
    #[case(b"GET /metrics\r\n\r\n", None)]
    #[case(b"GET  /metrics HTTP/1.1\r\n\r\n", None)]
    #[case(b"GET http://host/metrics HTTP/1.1\r\n\r\n", None)]
    #[case(b"G(T /metrics HTTP/1.1\r\n\r\n", None)]
    #[case(b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", None)]
    #[case(b"GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n", None)]
    #[case(b"GET /metrics HTTP/1.1\r\nA: \x01\r\n\r\n", None)]
    #[case(b"GET /\xff HTTP/1.1\r\n\r\n", None)]
    fn request_heads_are_checked(#[case] head: &[u8], #[case] request: Option<(&str, &str)>) {
        let parsed = parse_head(head).map(|r| (r.method, r.target));
        assert_eq!(parsed, request);
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
            let (head, body) = text.split_once("\r\n\r\n").expect("a reply head");
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            let status = status_line
                .strip_prefix("HTTP/1.1 ")
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
    #[case::http2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400)]
    #[tokio::test]
    async fn answers_each_request_with_its_status(#[case] request: &[u8], #[case] status: u16) {
        let (address, _server) = start(rendered, HEAD_TIMEOUT).await;
        let reply = exchange(address, request).await;
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.header("Connection"), Some("close"));
        if status == 405 {
            assert_eq!(reply.header("Allow"), Some("GET, HEAD"));
        }
        if status != 200 {
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
    async fn a_slow_head_times_out() {
        let (address, _server) = start(rendered, Duration::from_millis(200)).await;
        let reply = exchange(address, b"GET /metrics HTTP/1.1\r\nHost:").await;
        assert_eq!(reply.status, 408, "{reply:?}");
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
