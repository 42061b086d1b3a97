//! The rows of `hairpin conntrack list`: one per flow, from the two entries
//! (original and reply direction) the conntrack tables hold for it.
//!
//! The tables are read once, in batches, in the kernel's order, so a flow's
//! two entries come at unrelated moments. Each waits in a hash map, keyed
//! by its own key, until its partner comes: one pass over the table and no
//! lookup system call per flow. What waits is at most the table's size (an
//! original direction waits whole, a reply direction only its totals). Two
//! entries pair only when each names the other: after the new-flow table
//! evicted one direction of a flow, the survivor may point at a key a later
//! flow took, and is shown alone rather than with a stranger's totals. The
//! maps hash with foldhash, seeded at random: several times faster than
//! SipHash on these 16-byte keys, and a WAN sender who picks its ports
//! still cannot aim at its buckets.

use std::fmt;

use foldhash::HashMap;

use hairpin_common::{DIRECTION_ORIGINAL, FlowEntry, FlowKey, KIND_HAIRPIN, Settings, state};
use serde::Serialize;

use crate::maps::{Maps, MapsError, Table, host_addr};

/// What a flow's row needs of its reply direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyTotals {
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl From<&FlowEntry> for ReplyTotals {
    fn from(entry: &FlowEntry) -> Self {
        Self { last_seen_ns: entry.last_seen_ns, packets: entry.packets.into(), bytes: entry.bytes }
    }
}

/// One flow: its original direction's key and entry, and its reply
/// direction's totals when that entry exists.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub original: FlowEntry,
    pub reply: Option<ReplyTotals>,
}

/// Pairs the entries of one table as they are read, handing each flow on
/// once both of its entries were seen (or, by [`Pairing::finish`], its
/// original direction alone).
#[derive(Default)]
pub struct Pairing {
    /// Original directions waiting, by their key.
    originals: HashMap<FlowKey, FlowEntry>,
    /// Reply directions waiting, by their key: the original direction they
    /// name, and their totals.
    replies: HashMap<FlowKey, (FlowKey, ReplyTotals)>,
}

impl Pairing {
    pub fn push<E>(
        &mut self,
        key: &FlowKey,
        entry: &FlowEntry,
        flow: &mut impl FnMut(Flow) -> Result<(), E>,
    ) -> Result<(), E> {
        // Each direction's entry holds the other's key, reversed.
        let partner = entry.translated.reversed();
        if entry.direction == DIRECTION_ORIGINAL {
            if self.replies.get(&partner).is_some_and(|(named, _)| named == key) {
                let reply = self.replies.remove(&partner).map(|(_, reply)| reply);
                return flow(Flow { key: *key, original: *entry, reply });
            }
            self.originals.insert(*key, *entry);
        } else {
            if self.originals.get(&partner).is_some_and(|o| o.translated.reversed() == *key)
                && let Some(original) = self.originals.remove(&partner)
            {
                return flow(Flow { key: partner, original, reply: Some(entry.into()) });
            }
            self.replies.insert(*key, (partner, entry.into()));
        }
        Ok(())
    }

    /// The flows whose reply entry never came; a reply entry without its
    /// original direction is no flow to show.
    pub fn finish<E>(self, flow: &mut impl FnMut(Flow) -> Result<(), E>) -> Result<(), E> {
        for (key, original) in self.originals {
            flow(Flow { key, original, reply: None })?;
        }
        Ok(())
    }
}

/// Calls `row` with each flow of both tables, read in batches; how many.
pub fn for_each_flow<E: From<MapsError>>(
    maps: &Maps,
    mut row: impl FnMut(Table, Flow) -> Result<(), E>,
) -> Result<usize, E> {
    let mut flows = 0;
    for table in [Table::Established, Table::New] {
        let mut pairing = Pairing::default();
        let mut each = |flow: Flow| {
            flows += 1;
            row(table, flow)
        };
        maps.for_each_conntrack_entry(table, |key, entry| pairing.push(key, entry, &mut each))?;
        pairing.finish(&mut each)?;
    }
    Ok(flows)
}

/// `addr:port` of one side of a tuple (both in network order).
#[derive(Clone, Copy, Debug)]
pub struct Endpoint(pub u32, pub u16);

/// `src -> dst` of a tuple.
#[derive(Clone, Copy, Debug)]
pub struct Tuple(pub FlowKey);

/// An address text built in place: a listing writes millions, and through
/// `fmt` each costs a dozen calls and, in JSON, one escaping pass per piece.
struct Text {
    bytes: [u8; Text::CAPACITY],
    len: usize,
}

impl Text {
    /// `255.255.255.255:65535 -> 255.255.255.255:65535`.
    const CAPACITY: usize = 46;

    fn new() -> Self {
        Self { bytes: [0; Self::CAPACITY], len: 0 }
    }

    fn push(&mut self, text: &[u8]) {
        self.bytes[self.len..self.len + text.len()].copy_from_slice(text);
        self.len += text.len();
    }

    fn number(&mut self, n: u16) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    fn endpoint(&mut self, Endpoint(addr, port): Endpoint) {
        for (i, octet) in host_addr(addr).octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b".");
            }
            self.number(octet.into());
        }
        self.push(b":");
        self.number(u16::from_be(port));
    }

    fn tuple(&mut self, Tuple(key): Tuple) {
        self.endpoint(Endpoint(key.src_addr, key.src_port));
        self.push(b" -> ");
        self.endpoint(Endpoint(key.dst_addr, key.dst_port));
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).expect("digits, dots and colons")
    }
}

impl From<Endpoint> for Text {
    fn from(endpoint: Endpoint) -> Self {
        let mut text = Text::new();
        text.endpoint(endpoint);
        text
    }
}

impl From<Tuple> for Text {
    fn from(tuple: Tuple) -> Self {
        let mut text = Text::new();
        text.tuple(tuple);
        text
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Text::from(*self).as_str())
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Text::from(*self).as_str())
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Text::from(*self).as_str())
    }
}

impl Serialize for Tuple {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Text::from(*self).as_str())
    }
}

/// A flow as `conntrack list` shows it (and `--json` writes it), its
/// addresses formatted as they are written, not into strings first.
#[derive(Clone, Debug, Serialize)]
pub struct FlowRow {
    pub proto: &'static str,
    pub kind: &'static str,
    pub state: &'static str,
    pub table: &'static str,
    /// client → public, as the client sent it.
    pub original: Tuple,
    /// as the server sees it.
    pub translated: Tuple,
    /// The real client behind the translated source.
    pub client: Endpoint,
    pub age_s: u64,
    pub timeout_left_s: u64,
    pub packets: u64,
    pub bytes: u64,
}

impl FlowRow {
    /// The row of `flow` in `table` at `now_ns` (CLOCK_MONOTONIC_COARSE).
    pub fn new(table: Table, flow: &Flow, settings: &Settings, now_ns: u64) -> Self {
        let Flow { key, original, reply } = flow;
        let last_seen =
            reply.map_or(original.last_seen_ns, |r| r.last_seen_ns.max(original.last_seen_ns));
        let idle = now_ns.saturating_sub(last_seen);
        let timeout = settings.timeout_ns(original.state);
        FlowRow {
            proto: if key.proto == 6 { "tcp" } else { "udp" },
            kind: if original.kind == KIND_HAIRPIN { "hairpin" } else { "forward" },
            state: state::name(original.state),
            table: match table {
                Table::Established => "established",
                Table::New => "new",
            },
            original: Tuple(*key),
            translated: Tuple(original.translated),
            client: Endpoint(key.src_addr, key.src_port),
            age_s: (now_ns / 1_000_000_000).saturating_sub(original.created_s.into()),
            timeout_left_s: timeout.saturating_sub(idle) / 1_000_000_000,
            packets: u64::from(original.packets) + reply.map_or(0, |r| r.packets),
            bytes: original.bytes + reply.map_or(0, |r| r.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytemuck::Zeroable as _;
    use hairpin_common::DIRECTION_REPLY;

    use super::*;

    /// The two entries of flow `n`: the client 10.0.0.n:40000 to the
    /// public address, translated to come from the gateway's port 20000+n.
    fn flow(n: u8) -> [(FlowKey, FlowEntry); 2] {
        let wire = |a: [u8; 4]| u32::from_ne_bytes(a);
        let key = FlowKey::new(
            wire([10, 0, 0, n]),
            wire([203, 0, 113, 1]),
            40000u16.to_be(),
            80u16.to_be(),
            6,
        );
        let translated = FlowKey::new(
            wire([192, 168, 0, 1]),
            wire([192, 168, 0, 2]),
            (20000 + u16::from(n)).to_be(),
            80u16.to_be(),
            6,
        );
        let mut original = FlowEntry::zeroed();
        original.translated = translated;
        original.direction = DIRECTION_ORIGINAL;
        original.packets = 3;
        original.bytes = 300;
        let mut reply = FlowEntry::zeroed();
        reply.translated = key.reversed();
        reply.direction = DIRECTION_REPLY;
        reply.packets = 2;
        reply.bytes = 200;
        reply.last_seen_ns = u64::from(n);
        [(key, original), (translated.reversed(), reply)]
    }

    #[rstest::rstest]
    #[case::widest([255, 255, 255, 255], 65535, [255, 255, 255, 254], 65534)]
    #[case::narrowest([0, 0, 0, 0], 0, [1, 2, 3, 4], 5)]
    #[case::mixed([192, 168, 0, 10], 40000, [203, 0, 113, 1], 80)]
    fn addresses_read_as_std_writes_them(
        #[case] src: [u8; 4],
        #[case] src_port: u16,
        #[case] dst: [u8; 4],
        #[case] dst_port: u16,
    ) {
        let wire = |a: [u8; 4]| u32::from_ne_bytes(a);
        let key = FlowKey::new(wire(src), wire(dst), src_port.to_be(), dst_port.to_be(), 6);
        let std = |a: [u8; 4], port: u16| format!("{}:{port}", std::net::Ipv4Addr::from(a));
        let expected = format!("{} -> {}", std(src, src_port), std(dst, dst_port));
        assert_eq!(Tuple(key).to_string(), expected);
        assert_eq!(Endpoint(key.src_addr, key.src_port).to_string(), std(src, src_port));
        assert_eq!(
            serde_json::to_string(&Tuple(key)).expect("a string"),
            format!("\"{expected}\""),
            "JSON writes the same text"
        );
    }

    fn paired(entries: &[(FlowKey, FlowEntry)]) -> Vec<Flow> {
        let mut flows = Vec::new();
        let mut each = |flow: Flow| -> Result<(), ()> {
            flows.push(flow);
            Ok(())
        };
        let mut pairing = Pairing::default();
        for (key, entry) in entries {
            pairing.push(key, entry, &mut each).expect("push");
        }
        pairing.finish(&mut each).expect("finish");
        flows
    }

    #[rstest::rstest]
    #[case::original_first(false)]
    #[case::reply_first(true)]
    fn each_flow_is_one_row_with_its_reply(#[case] reply_first: bool) {
        let mut entries: Vec<_> = (1..=3).flat_map(flow).collect();
        if reply_first {
            entries.reverse();
        }
        let flows = paired(&entries);
        assert_eq!(flows.len(), 3, "one row per flow: {flows:?}");
        for flow in &flows {
            let n = u32::from_ne_bytes(flow.key.src_addr.to_ne_bytes()).to_ne_bytes()[3];
            let reply = flow.reply.expect("every flow's reply entry was read");
            assert_eq!(reply.last_seen_ns, u64::from(n), "the reply of its own flow");
            assert_eq!((reply.packets, reply.bytes), (2, 200));
        }
    }

    #[test]
    fn an_original_without_its_reply_is_shown_and_a_lone_reply_is_not() {
        let [original, _] = flow(1);
        let [_, lone_reply] = flow(2);
        let flows = paired(&[lone_reply, original]);
        assert_eq!(flows.len(), 1, "{flows:?}");
        assert_eq!(flows[0].key, original.0);
        assert_eq!(flows[0].reply, None);
    }

    /// After an eviction: flow 1's original survives, but its reply key was
    /// taken by flow 2, whose reply names flow 2's original. In any order,
    /// flow 2 is paired with its own reply and flow 1 is shown alone.
    #[rstest::rstest]
    #[case::orphan_first(&[0, 1, 2])]
    #[case::reply_first(&[2, 0, 1])]
    #[case::own_original_first(&[1, 2, 0])]
    #[case::reply_between(&[1, 0, 2])]
    fn an_orphan_sharing_a_reply_key_is_shown_alone(#[case] order: &[usize]) {
        let [(orphan_key, mut orphan), _] = flow(1);
        let [(key, original), (reply_key, reply)] = flow(2);
        orphan.translated = reply_key.reversed();
        let entries = [(orphan_key, orphan), (key, original), (reply_key, reply)];
        let ordered: Vec<_> = order.iter().map(|&i| entries[i]).collect();
        let mut flows = paired(&ordered);
        flows.sort_by_key(|flow| flow.key.src_addr.to_ne_bytes());
        assert_eq!(flows.len(), 2, "both originals are shown: {flows:?}");
        assert_eq!((flows[0].key, flows[0].reply), (orphan_key, None), "the orphan alone");
        assert_eq!(flows[1].key, key);
        assert_eq!(flows[1].reply, Some((&reply).into()), "flow 2 with its own reply");
    }

    #[test]
    fn a_row_adds_both_directions_and_writes_addresses_as_text() {
        let [original, reply] = flow(7);
        let flows = paired(&[original, reply]);
        let settings = Settings { tcp_transitory_ns: 60_000_000_000, ..Default::default() };
        let row = FlowRow::new(Table::New, &flows[0], &settings, 10_000_000_000);
        let json = serde_json::to_value(&row).expect("a row serializes");
        assert_eq!(json["original"], "10.0.0.7:40000 -> 203.0.113.1:80");
        assert_eq!(json["translated"], "192.168.0.1:20007 -> 192.168.0.2:80");
        assert_eq!(json["client"], "10.0.0.7:40000");
        assert_eq!(json["table"], "new");
        assert_eq!((json["packets"].as_u64(), json["bytes"].as_u64()), (Some(5), Some(500)));
        assert_eq!(json["timeout_left_s"], 50, "idle since the reply at 7 ns: 50 s of 60 left");
    }
}
