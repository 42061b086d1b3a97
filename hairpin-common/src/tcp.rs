//! TCP tracking: the connection's state and both directions' sequence
//! spaces, in the essentials of netfilter's `tcp_in_window`
//! (nf_conntrack_proto_tcp.c), so that a packet with the right tuple but a
//! sequence number an attacker guessed moves nothing.
//!
//! What is checked:
//! - the handshake: the SYN-ACK must acknowledge the SYN exactly and the
//!   ACK that establishes the flow must acknowledge the SYN-ACK exactly;
//! - every later segment must fall in the window its receiver announced and
//!   acknowledge only what its receiver has sent (with netfilter's slack for
//!   retransmissions, window probes and acknowledgments of old data);
//! - a RST closes the flow only when its sequence number is exactly the
//!   one the receiver expects (RFC 5961 §3); one elsewhere in the
//!   window is sent on for the endpoint to answer with a challenge ACK, and
//!   moves nothing here;
//! - a new SYN on a flow that is open here is sent on unchanged, and a
//!   SYN-ACK that acknowledges it starts the flow again (netfilter's
//!   resynchronisation after a client lost the connection).
//!
//! Sequence numbers compare modulo 2^32, as in `before()`/`after()`.

use crate::{
    Counter, DIRECTION_ORIGINAL, FIN_SEEN_ORIGINAL, FIN_SEEN_REPLY, TcpWindow,
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    state,
};

/// `TcpWindow::scale` of a side whose SYN had no window scale option.
pub const NO_WINDOW_SCALE: u8 = 0xff;
/// RFC 7323 §2.3: larger shifts are taken as 14.
pub const MAX_WINDOW_SCALE: u8 = 14;
/// `TcpWindow::flags`: `max_ack` holds an acknowledgment this side sent.
pub const ACK_SEEN: u8 = 1;
/// `TcpWindow::flags` of the client: it sent a new SYN while the flow was
/// open; `isn_end` and `resync_scale` are that SYN's.
pub const RESYNC: u8 = 2;
/// netfilter's `MAXACKWINDOW` floor: how far below the receiver's highest
/// sequence number an acknowledgment may be.
const MIN_ACK_WINDOW: u32 = 66_000;
/// Longest TCP options (data offset 15).
pub const MAX_OPTIONS_LEN: usize = 40;

/// What tracking needs of a TCP segment, in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub flags: u8,
    /// Payload bytes (after the TCP header and options).
    pub payload_len: u32,
    /// The window scale option of a SYN, else `NO_WINDOW_SCALE`.
    pub window_scale: u8,
}

impl Segment {
    const fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The sequence number after the segment: SYN and FIN count one each.
    const fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.payload_len)
            .wrapping_add(self.has(TCP_SYN) as u32)
            .wrapping_add(self.has(TCP_FIN) as u32)
    }
}

/// `a` comes after `b` in sequence space.
const fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

const fn max_seq(a: u32, b: u32) -> u32 {
    if after(a, b) { a } else { b }
}

/// The window scale option (kind 3) among a SYN's options, else
/// `NO_WINDOW_SCALE`. `len` is how many of `options` the header holds.
#[inline(always)]
pub fn window_scale(options: &[u8; MAX_OPTIONS_LEN], len: usize) -> u8 {
    const END: u8 = 0;
    const NOP: u8 = 1;
    const WINDOW_SCALE: u8 = 3;
    let len = if len > MAX_OPTIONS_LEN { MAX_OPTIONS_LEN } else { len };
    let mut at = 0;
    // Each option is at least one byte long: the loop is bounded by `len`.
    while at < len {
        let kind = options[at];
        if kind == END {
            break;
        }
        if kind == NOP {
            at += 1;
            continue;
        }
        if at + 1 >= len {
            break;
        }
        let option_len = options[at + 1] as usize;
        if option_len < 2 {
            break;
        }
        if kind == WINDOW_SCALE && option_len == 3 && at + 2 < len {
            let shift = options[at + 2];
            return if shift > MAX_WINDOW_SCALE { MAX_WINDOW_SCALE } else { shift };
        }
        at += option_len;
    }
    NO_WINDOW_SCALE
}

/// Both directions' windows for a flow opened by `syn` (the client's SYN).
pub const fn open(syn: &Segment) -> [TcpWindow; 2] {
    let end = syn.end();
    let client = TcpWindow {
        end,
        max_end: end,
        max_win: if syn.window == 0 { 1 } else { syn.window as u32 },
        max_ack: 0,
        isn_end: syn.seq.wrapping_add(1),
        scale: syn.window_scale,
        flags: 0,
        resync_scale: 0,
        _pad: 0,
    };
    [client, NOTHING_SEEN]
}

/// A side of which nothing has been seen yet.
pub const NOTHING_SEEN: TcpWindow = TcpWindow {
    end: 0,
    max_end: 0,
    max_win: 0,
    max_ack: 0,
    isn_end: 0,
    scale: 0,
    flags: 0,
    resync_scale: 0,
    _pad: 0,
};

/// A segment's effect on its flow, when tracking lets it through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub state: u8,
    pub fin_seen: u8,
    /// A RST inside the window but not at the expected sequence number:
    /// sent on (the endpoint answers it with a challenge ACK), but the flow
    /// stays as it was.
    pub rst_not_exact: bool,
}

/// Tracks a segment sent in `direction` of a flow in `flow_state`: updates
/// `windows` and gives the flow's next state, or the counter of why the
/// segment must not be sent on (nothing is updated then).
#[inline(always)]
pub fn track(
    flow_state: u8,
    fin_seen: u8,
    windows: &mut [TcpWindow; 2],
    direction: u8,
    segment: &Segment,
) -> Result<Tracked, Counter> {
    let original = direction == DIRECTION_ORIGINAL;
    let (syn, ack, rst) = (segment.has(TCP_SYN), segment.has(TCP_ACK), segment.has(TCP_RST));
    let unchanged = Tracked { state: flow_state, fin_seen, rst_not_exact: false };
    let bare_syn = syn && !ack && !rst;
    match flow_state {
        state::TCP_SYN_SENT => return syn_sent(windows, original, segment, unchanged),
        state::TCP_TIME_WAIT | state::TCP_CLOSE if original && bare_syn => {
            // A closed connection's tuple reused for a new one.
            *windows = open(segment);
            return Ok(Tracked { state: state::TCP_SYN_SENT, fin_seen: 0, rst_not_exact: false });
        }
        state::TCP_SYN_RECV => {}
        _ if original && bare_syn => {
            // A new SYN on a flow still open here: the client lost the
            // connection (rebooted, or a NAT in front of it reused the
            // port). Sent on as it is, changing nothing; if the server
            // answers it with a SYN-ACK, the flow starts again from it
            // (netfilter's resynchronisation). If the server still has the
            // old connection, its challenge ACK and the client's RST end it.
            let client = &mut windows[0];
            client.isn_end = segment.seq.wrapping_add(1);
            client.resync_scale = segment.window_scale;
            client.flags |= RESYNC;
            return Ok(unchanged);
        }
        _ if !original
            && syn
            && ack
            && !rst
            && windows[0].flags & RESYNC != 0
            && segment.ack == windows[0].isn_end =>
        {
            let client = windows[0];
            let resync = Segment {
                seq: client.isn_end.wrapping_sub(1),
                ack: 0,
                window: u16::MAX,
                flags: TCP_SYN,
                payload_len: 0,
                window_scale: client.resync_scale,
            };
            *windows = open(&resync);
            return syn_ack(windows, segment).map(|()| Tracked {
                state: state::TCP_SYN_RECV,
                fin_seen: 0,
                rst_not_exact: false,
            });
        }
        _ => {}
    }
    let index = if original { 0 } else { 1 };
    let (sender, receiver) = (windows[index], windows[1 - index]);
    let end = segment.end();
    // A segment without ACK (or a RST with a zero one) is taken as
    // acknowledging everything, as netfilter does.
    let acked = if !ack || (rst && segment.ack == 0) { receiver.end } else { segment.ack };
    let ack_window = if sender.max_win > MIN_ACK_WINDOW { sender.max_win } else { MIN_ACK_WINDOW };
    let in_window = !after(segment.seq, sender.max_end)
        && (receiver.max_win == 0 || !after(sender.end.wrapping_sub(receiver.max_win), end))
        && !after(acked, receiver.end)
        && !after(receiver.end.wrapping_sub(ack_window), acked);
    if !in_window {
        return Err(Counter::TcpOutOfWindow);
    }
    if rst {
        // RFC 5961 §3: only a RST at the sequence number the receiver
        // expects next closes: what it last acknowledged, or the end of
        // what the sender has sent (a stack resets at its snd_nxt). No RST
        // moves the windows, so a guess never makes the next guess exact.
        let exact = segment.seq == sender.end
            || (receiver.flags & ACK_SEEN != 0 && segment.seq == receiver.max_ack);
        if exact {
            return Ok(Tracked { state: state::TCP_CLOSE, ..unchanged });
        }
        return Ok(Tracked { rst_not_exact: true, ..unchanged });
    }
    update_windows(windows, index, segment, acked);
    let mut tracked = unchanged;
    if segment.has(TCP_FIN) {
        tracked.fin_seen |= if original { FIN_SEEN_ORIGINAL } else { FIN_SEEN_REPLY };
        tracked.state = if tracked.fin_seen == FIN_SEEN_ORIGINAL | FIN_SEEN_REPLY {
            state::TCP_TIME_WAIT
        } else {
            match flow_state {
                state::TCP_SYN_RECV | state::TCP_ESTABLISHED => state::TCP_FIN_WAIT,
                other => other,
            }
        };
        return Ok(tracked);
    }
    if ack && !syn {
        let peer = windows[1 - index];
        let first_fin_by_original = fin_seen & FIN_SEEN_ORIGINAL != 0;
        tracked.state = match flow_state {
            // The client acknowledges the SYN-ACK (and perhaps data the
            // server sent right after it): now the flow is established.
            state::TCP_SYN_RECV if original && !after(peer.isn_end, segment.ack) => {
                state::TCP_ESTABLISHED
            }
            // The other side acknowledges the first FIN: half closed.
            state::TCP_FIN_WAIT if original != first_fin_by_original && segment.ack == peer.end => {
                state::TCP_CLOSE_WAIT
            }
            other => other,
        };
    }
    Ok(tracked)
}

/// A segment while the client's SYN waits for its answer.
#[inline(always)]
fn syn_sent(
    windows: &mut [TcpWindow; 2],
    original: bool,
    segment: &Segment,
    unchanged: Tracked,
) -> Result<Tracked, Counter> {
    let (syn, ack, rst) = (segment.has(TCP_SYN), segment.has(TCP_ACK), segment.has(TCP_RST));
    if original && syn && !ack && !rst {
        // The client's SYN again, perhaps with a new initial sequence number.
        *windows = open(segment);
        return Ok(unchanged);
    }
    if !original && syn && ack && !rst {
        return syn_ack(windows, segment)
            .map(|()| Tracked { state: state::TCP_SYN_RECV, ..unchanged });
    }
    if !original && ack && !syn && !rst && !segment.has(TCP_FIN) && segment.payload_len == 0 {
        // A server that still has an older connection on the tuple answers
        // with a challenge ACK (or from TIME_WAIT): the client's RST to it,
        // at that ACK's acknowledgment number, ends the old connection.
        windows[1].max_ack = segment.ack;
        windows[1].flags |= ACK_SEEN;
        return Ok(unchanged);
    }
    if rst {
        let client = windows[0];
        // RFC 9293 §3.10.7.3: in SYN-SENT a RST is acceptable only if it
        // acknowledges the SYN (some of it, with data in the SYN).
        let refused = !original
            && ack
            && !after(client.isn_end, segment.ack)
            && !after(segment.ack, client.end);
        let aborted = original
            && (segment.seq == client.end
                || (windows[1].flags & ACK_SEEN != 0 && segment.seq == windows[1].max_ack));
        if refused || aborted {
            return Ok(Tracked { state: state::TCP_CLOSE, ..unchanged });
        }
    }
    Err(Counter::TcpHandshakeInvalid)
}

/// The server's SYN-ACK: it must acknowledge the client's SYN (all of it,
/// or only the flag when the server declines data sent with the SYN); it
/// starts the server's side of the windows.
#[inline(always)]
fn syn_ack(windows: &mut [TcpWindow; 2], segment: &Segment) -> Result<(), Counter> {
    let client = &mut windows[0];
    if after(client.isn_end, segment.ack) || after(segment.ack, client.end) {
        return Err(Counter::TcpHandshakeInvalid);
    }
    // RFC 7323 §2.2: scaling is on only when both sides offered it.
    let both_scale = client.scale != NO_WINDOW_SCALE && segment.window_scale != NO_WINDOW_SCALE;
    client.scale = if both_scale { client.scale } else { 0 };
    client.flags &= !RESYNC;
    let end = segment.end();
    let window = segment.window as u32;
    client.max_end = max_seq(
        client.max_end,
        segment.ack.wrapping_add(window).wrapping_add((window == 0) as u32),
    );
    client.max_end = max_seq(client.max_end, client.end);
    let window = if window == 0 { 1 } else { window };
    windows[1] = TcpWindow {
        end,
        // As netfilter: the server may send its first window's worth before
        // the client's ACK (TCP Fast Open servers do).
        max_end: end.wrapping_add(window),
        max_win: window,
        max_ack: segment.ack,
        isn_end: segment.seq.wrapping_add(1),
        scale: if both_scale { segment.window_scale } else { 0 },
        flags: ACK_SEEN,
        resync_scale: 0,
        _pad: 0,
    };
    Ok(())
}

/// netfilter's window updates after a segment passed the checks.
#[inline(always)]
fn update_windows(windows: &mut [TcpWindow; 2], index: usize, segment: &Segment, acked: u32) {
    let sender_scale = windows[index].scale;
    let shift = if sender_scale == NO_WINDOW_SCALE { 0 } else { sender_scale as u32 };
    let window =
        if segment.has(TCP_SYN) { segment.window as u32 } else { (segment.window as u32) << shift };
    let end = segment.end();
    let sender = &mut windows[index];
    if sender.max_win < window {
        sender.max_win = window;
    }
    if after(end, sender.end) {
        sender.end = end;
    }
    if segment.has(TCP_ACK) {
        if sender.flags & ACK_SEEN == 0 || after(segment.ack, sender.max_ack) {
            sender.max_ack = segment.ack;
        }
        sender.flags |= ACK_SEEN;
    }
    let sender_max_end = sender.max_end;
    let receiver = &mut windows[1 - index];
    if receiver.max_win != 0 && after(end, sender_max_end) {
        receiver.max_win = receiver.max_win.wrapping_add(end.wrapping_sub(sender_max_end));
    }
    let limit = acked.wrapping_add(window);
    if after(limit, receiver.max_end.wrapping_sub(1)) {
        receiver.max_end = if window == 0 { limit.wrapping_add(1) } else { limit };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;
    use rstest::rstest;

    use super::*;
    use crate::DIRECTION_REPLY;

    const O: u8 = DIRECTION_ORIGINAL;
    const R: u8 = DIRECTION_REPLY;
    const SYN: u8 = TCP_SYN;
    const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
    const ACK: u8 = TCP_ACK;
    const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
    const RST: u8 = TCP_RST;
    const RST_ACK: u8 = TCP_RST | TCP_ACK;

    const CLIENT_ISN: u32 = 0xffff_ff00; // wraps around during the tests
    const SERVER_ISN: u32 = 7_000_000;

    use state::{
        TCP_CLOSE as CLOSE, TCP_CLOSE_WAIT as CLOSE_WAIT, TCP_ESTABLISHED as EST,
        TCP_FIN_WAIT as FIN_WAIT, TCP_SYN_RECV as SYN_RECV, TCP_SYN_SENT as SYN_SENT,
        TCP_TIME_WAIT as TIME_WAIT,
    };

    fn seg(flags: u8, seq: u32, ack: u32, payload_len: u32) -> Segment {
        Segment { seq, ack, window: 64240, flags, payload_len, window_scale: NO_WINDOW_SCALE }
    }

    /// A connection being tracked, as the datapath holds it.
    struct Conn {
        state: u8,
        fin_seen: u8,
        windows: [TcpWindow; 2],
        /// Next sequence numbers of the client and the server.
        next: [u32; 2],
    }

    impl Conn {
        fn opened(client_scale: u8) -> Self {
            let syn = Segment { window_scale: client_scale, ..seg(SYN, CLIENT_ISN, 0, 0) };
            Self {
                state: SYN_SENT,
                fin_seen: 0,
                windows: open(&syn),
                next: [CLIENT_ISN.wrapping_add(1), SERVER_ISN],
            }
        }

        fn established() -> Self {
            let mut conn = Self::opened(7);
            let synack = Segment {
                window_scale: 7,
                ..seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0)
            };
            conn.send(R, &synack).expect("SYN-ACK");
            conn.next[1] = SERVER_ISN.wrapping_add(1);
            conn.send(O, &seg(ACK, conn.next[0], conn.next[1], 0)).expect("ACK");
            assert_eq!(conn.state, EST, "handshake completes");
            conn
        }

        fn send(&mut self, direction: u8, segment: &Segment) -> Result<Tracked, Counter> {
            let tracked = track(self.state, self.fin_seen, &mut self.windows, direction, segment)?;
            self.state = tracked.state;
            self.fin_seen = tracked.fin_seen;
            Ok(tracked)
        }

        /// `len` bytes of data from `direction`, acknowledging all the peer sent.
        fn data(&mut self, direction: u8, len: u32) -> Result<Tracked, Counter> {
            let (from, to) = if direction == O { (0, 1) } else { (1, 0) };
            let segment = seg(ACK, self.next[from], self.next[to], len);
            let result = self.send(direction, &segment);
            if result.is_ok() {
                self.next[from] = self.next[from].wrapping_add(len);
            }
            result
        }
    }

    #[test]
    fn the_handshake_establishes_only_with_exact_acknowledgments() {
        let mut conn = Conn::opened(NO_WINDOW_SCALE);
        assert_eq!(
            conn.send(R, &seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(2), 0)),
            Err(Counter::TcpHandshakeInvalid),
            "a SYN-ACK acknowledging more than the SYN"
        );
        assert_eq!(
            conn.send(R, &seg(SYN_ACK, SERVER_ISN, 12345, 0)),
            Err(Counter::TcpHandshakeInvalid),
            "a SYN-ACK with a guessed acknowledgment"
        );
        assert_eq!(conn.state, SYN_SENT);
        conn.send(R, &seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0)).expect("SYN-ACK");
        assert_eq!(conn.state, SYN_RECV);
        conn.send(O, &seg(ACK, CLIENT_ISN.wrapping_add(1), SERVER_ISN, 0))
            .expect("an ACK of older data is in the window");
        assert_eq!(conn.state, SYN_RECV, "an ACK that does not acknowledge the SYN-ACK");
        assert_eq!(
            conn.send(O, &seg(ACK, CLIENT_ISN.wrapping_add(1), SERVER_ISN.wrapping_add(2), 0)),
            Err(Counter::TcpOutOfWindow),
            "an ACK of data the server never sent"
        );
        conn.send(O, &seg(ACK, CLIENT_ISN.wrapping_add(1), SERVER_ISN.wrapping_add(1), 0))
            .expect("final ACK");
        assert_eq!(conn.state, EST);
    }

    #[rstest]
    #[case::data_before_the_syn_ack(O, ACK)]
    #[case::fin_from_the_server(R, FIN_ACK)]
    #[case::syn_from_the_server(R, SYN)]
    fn nothing_but_the_handshake_passes_in_syn_sent(#[case] direction: u8, #[case] flags: u8) {
        let mut conn = Conn::opened(NO_WINDOW_SCALE);
        assert_eq!(
            conn.send(direction, &seg(flags, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0)),
            Err(Counter::TcpHandshakeInvalid)
        );
        assert_eq!(conn.state, SYN_SENT);
    }

    #[test]
    fn a_refusal_must_acknowledge_the_syn() {
        let mut conn = Conn::opened(NO_WINDOW_SCALE);
        assert_eq!(conn.send(R, &seg(RST_ACK, 0, 999, 0)), Err(Counter::TcpHandshakeInvalid));
        assert_eq!(conn.send(R, &seg(RST, 0, 0, 0)), Err(Counter::TcpHandshakeInvalid));
        conn.send(R, &seg(RST_ACK, 0, CLIENT_ISN.wrapping_add(1), 0)).expect("refused");
        assert_eq!(conn.state, CLOSE);
    }

    #[test]
    fn a_syn_again_restarts_the_opening() {
        let mut conn = Conn::opened(NO_WINDOW_SCALE);
        conn.send(O, &seg(SYN, 5, 0, 0)).expect("SYN with another ISN");
        assert_eq!(conn.state, SYN_SENT);
        assert_eq!(
            conn.send(R, &seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0)),
            Err(Counter::TcpHandshakeInvalid),
            "the old SYN is no longer the one to acknowledge"
        );
        conn.send(R, &seg(SYN_ACK, SERVER_ISN, 6, 0)).expect("SYN-ACK of the new SYN");
    }

    #[test]
    fn data_flows_both_ways_across_the_wrap() {
        let mut conn = Conn::established();
        for round in 0..200 {
            conn.data(O, 1448).unwrap_or_else(|c| panic!("client data, round {round}: {c:?}"));
            conn.data(R, 1448).unwrap_or_else(|c| panic!("server data, round {round}: {c:?}"));
        }
        assert_eq!(conn.state, EST);
    }

    #[test]
    fn a_scaled_window_lets_a_sender_run_ahead_of_the_acks() {
        let mut conn = Conn::established();
        // The server sends 2 MB unacknowledged: allowed by 64240 << 7.
        let mut seq = conn.next[1];
        for burst in 0..1400 {
            conn.send(R, &seg(ACK, seq, conn.next[0], 1448))
                .unwrap_or_else(|c| panic!("burst {burst}: {c:?}"));
            seq = seq.wrapping_add(1448);
        }
    }

    #[test]
    fn without_window_scaling_the_window_is_the_raw_one() {
        let mut conn = Conn::opened(7);
        conn.send(R, &seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0)).expect("SYN-ACK");
        conn.send(O, &seg(ACK, CLIENT_ISN.wrapping_add(1), SERVER_ISN.wrapping_add(1), 0))
            .expect("ACK");
        assert_eq!((conn.windows[0].scale, conn.windows[1].scale), (0, 0), "one side offered");
        let beyond = CLIENT_ISN.wrapping_add(1).wrapping_add(64240 * 2);
        assert_eq!(
            conn.send(O, &seg(ACK, beyond, SERVER_ISN.wrapping_add(1), 100)),
            Err(Counter::TcpOutOfWindow),
            "past the server's unscaled window"
        );
    }

    #[test]
    fn retransmissions_and_window_probes_pass() {
        let mut conn = Conn::established();
        let start = conn.next[0];
        for _ in 0..10 {
            conn.data(O, 1000).expect("data");
        }
        conn.send(O, &seg(ACK, start, conn.next[1], 1000)).expect("an old segment again");
        let mut probe = seg(ACK, conn.next[0], conn.next[1], 1);
        probe.window = 0;
        conn.send(R, &Segment { window: 0, ..seg(ACK, conn.next[1], conn.next[0], 0) })
            .expect("zero window");
        conn.send(O, &probe).expect("a window probe one byte past a zero window");
    }

    #[test]
    fn sack_blocks_do_not_matter_the_ack_does() {
        // A receiver that lost a segment keeps acknowledging the hole (its
        // SACK blocks name what came after); the sender goes on sending.
        let mut conn = Conn::established();
        let hole = conn.next[0];
        for _ in 0..20 {
            conn.data(O, 1448).expect("data");
        }
        for _ in 0..3 {
            conn.send(R, &seg(ACK, conn.next[1], hole, 0)).expect("duplicate ACK of the hole");
        }
        conn.send(O, &seg(ACK, hole, conn.next[1], 1448)).expect("the hole retransmitted");
    }

    #[rstest]
    #[case::far_ahead(1 << 30)]
    #[case::behind(0u32.wrapping_sub(1 << 30))]
    #[case::half_way_round(1 << 31)]
    fn a_rst_outside_the_window_is_refused(#[case] offset: u32) {
        let mut conn = Conn::established();
        conn.data(R, 5000).expect("data");
        let blind = seg(RST, conn.next[1].wrapping_add(offset), 0, 0);
        assert_eq!(conn.send(R, &blind), Err(Counter::TcpOutOfWindow));
        assert_eq!(conn.state, EST, "the flow stays established");
    }

    #[test]
    fn a_rst_in_the_window_but_not_exact_moves_nothing() {
        let mut conn = Conn::established();
        let guess = seg(RST, conn.next[1].wrapping_add(1000), 0, 0);
        assert_eq!(
            conn.send(R, &guess),
            Ok(Tracked { state: EST, fin_seen: 0, rst_not_exact: true }),
            "sent on for the endpoint's challenge ACK, the flow unchanged"
        );
        conn.send(R, &seg(RST, conn.next[1], 0, 0)).expect("the exact RST");
        assert_eq!(conn.state, CLOSE);
    }

    #[test]
    fn a_rst_at_the_receivers_acknowledgment_closes() {
        let mut conn = Conn::established();
        conn.data(O, 500).expect("client data");
        conn.data(R, 0).expect("the server acknowledges it");
        // The client aborts after losing nothing: its RST carries what the
        // server acknowledged.
        conn.send(O, &seg(RST_ACK, conn.next[0], conn.next[1], 0)).expect("RST");
        assert_eq!(conn.state, CLOSE);
    }

    #[test]
    fn out_of_window_data_and_fin_are_refused() {
        let mut conn = Conn::established();
        let wild = conn.next[0].wrapping_add(100_000_000);
        assert_eq!(conn.send(O, &seg(ACK, wild, conn.next[1], 10)), Err(Counter::TcpOutOfWindow));
        assert_eq!(
            conn.send(O, &seg(FIN_ACK, wild, conn.next[1], 0)),
            Err(Counter::TcpOutOfWindow),
            "a blind FIN"
        );
        assert_eq!((conn.state, conn.fin_seen), (EST, 0));
        assert_eq!(
            conn.send(O, &seg(ACK, conn.next[0], conn.next[1].wrapping_add(1 << 20), 0)),
            Err(Counter::TcpOutOfWindow),
            "acknowledging data the server never sent"
        );
    }

    #[test]
    fn closing_follows_the_fins_and_their_acks() {
        let mut conn = Conn::established();
        conn.send(O, &seg(FIN_ACK, conn.next[0], conn.next[1], 0)).expect("client FIN");
        conn.next[0] = conn.next[0].wrapping_add(1);
        assert_eq!(conn.state, FIN_WAIT);
        conn.send(R, &seg(ACK, conn.next[1], conn.next[0].wrapping_sub(1), 0)).expect("old ack");
        assert_eq!(conn.state, FIN_WAIT, "an ACK that does not cover the FIN");
        conn.send(R, &seg(ACK, conn.next[1], conn.next[0], 0)).expect("ACK of the FIN");
        assert_eq!(conn.state, CLOSE_WAIT);
        conn.data(R, 300).expect("the server may still send");
        conn.send(R, &seg(FIN_ACK, conn.next[1], conn.next[0], 0)).expect("server FIN");
        conn.next[1] = conn.next[1].wrapping_add(1);
        assert_eq!(conn.state, TIME_WAIT);
        conn.send(O, &seg(ACK, conn.next[0], conn.next[1], 0)).expect("last ACK");
        assert_eq!(conn.state, TIME_WAIT);
        conn.send(O, &seg(SYN, 42, 0, 0)).expect("the tuple reused");
        assert_eq!(conn.state, SYN_SENT);
    }

    #[test]
    fn a_syn_ack_retransmitted_after_the_handshake_passes() {
        let mut conn = Conn::established();
        conn.send(R, &seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0))
            .expect("the server did not get the final ACK");
        assert_eq!(conn.state, EST);
    }

    #[test]
    fn the_same_guessed_rst_twice_closes_nothing() {
        let mut conn = Conn::established();
        conn.data(R, 5000).expect("data");
        let guess = seg(RST, conn.next[1].wrapping_add(700), 0, 0);
        for attempt in 0..3 {
            assert_eq!(
                conn.send(R, &guess).map(|t| t.rst_not_exact),
                Ok(true),
                "attempt {attempt}: a RST must not make itself exact"
            );
        }
        assert_eq!(conn.state, EST);
        assert_eq!(
            conn.send(O, &seg(SYN, 1, 0, 0)).map(|t| t.state),
            Ok(EST),
            "a SYN on the open flow changes nothing"
        );
    }

    #[test]
    fn a_challenge_ack_in_syn_sent_and_the_clients_rst_pass() {
        let mut conn = Conn::opened(NO_WINDOW_SCALE);
        // The server still has an old connection on the tuple.
        let old_next = 55_555;
        conn.send(R, &seg(ACK, 99, old_next, 0)).expect("the server's challenge ACK is sent on");
        assert_eq!(conn.state, SYN_SENT);
        conn.send(O, &seg(RST, old_next, 0, 0)).expect("the client's RST at its acknowledgment");
        assert_eq!(conn.state, CLOSE);
        conn.send(O, &seg(SYN, CLIENT_ISN, 0, 0)).expect("the client tries again");
        assert_eq!(conn.state, SYN_SENT);
    }

    #[test]
    fn a_client_that_lost_the_connection_can_open_it_again() {
        let mut conn = Conn::established();
        conn.data(O, 300).expect("data");
        let new_isn = 3_000_000_000;
        let syn = Segment { window_scale: 6, ..seg(SYN, new_isn, 0, 0) };
        assert_eq!(conn.send(O, &syn).map(|t| t.state), Ok(EST), "sent on, the flow unchanged");
        let new_server_isn = 42;
        let synack = Segment { window_scale: 6, ..seg(SYN_ACK, new_server_isn, new_isn + 1, 0) };
        conn.send(R, &synack).expect("the server answers the new SYN");
        assert_eq!(conn.state, SYN_RECV);
        conn.send(O, &seg(ACK, new_isn + 1, new_server_isn + 1, 0)).expect("ACK");
        assert_eq!(conn.state, EST);
        assert_eq!((conn.windows[0].scale, conn.windows[1].scale), (6, 6));
    }

    #[test]
    fn a_stale_syn_ack_does_not_restart_an_open_flow() {
        let mut conn = Conn::established();
        assert_eq!(
            conn.send(R, &seg(SYN_ACK, 42, 777, 0)),
            Err(Counter::TcpOutOfWindow),
            "no SYN of the client's asked for it"
        );
        assert_eq!(conn.state, EST);
    }

    #[test]
    fn fast_open_data_in_the_syn_and_before_the_final_ack() {
        let syn = Segment { window_scale: 7, ..seg(SYN, CLIENT_ISN, 0, 100) };
        let mut conn = Conn {
            state: SYN_SENT,
            fin_seen: 0,
            windows: open(&syn),
            next: [CLIENT_ISN.wrapping_add(101), SERVER_ISN],
        };
        // The server declines the SYN's data: it acknowledges the flag only.
        let synack =
            Segment { window_scale: 7, ..seg(SYN_ACK, SERVER_ISN, CLIENT_ISN.wrapping_add(1), 0) };
        conn.send(R, &synack).expect("a SYN-ACK of the flag alone");
        assert_eq!(conn.state, SYN_RECV);
        // A Fast Open server sends data right after its SYN-ACK.
        for segment in 0..10 {
            let seq = SERVER_ISN.wrapping_add(1 + segment * 1448);
            conn.send(R, &seg(ACK, seq, CLIENT_ISN.wrapping_add(1), 1448))
                .unwrap_or_else(|c| panic!("server segment {segment}: {c:?}"));
        }
        conn.send(O, &seg(ACK, CLIENT_ISN.wrapping_add(1), SERVER_ISN.wrapping_add(1), 0))
            .expect("the client's ACK of the SYN-ACK, before the data reached it");
        assert_eq!(conn.state, EST);
    }

    #[test]
    fn keepalives_pass() {
        let mut conn = Conn::established();
        conn.data(O, 100).expect("data");
        conn.data(R, 0).expect("ack");
        let probe = seg(ACK, conn.next[0].wrapping_sub(1), conn.next[1], 1);
        conn.send(O, &probe).expect("a keepalive one byte behind");
        conn.send(O, &seg(ACK, conn.next[0].wrapping_sub(1), conn.next[1], 0))
            .expect("an empty keepalive");
        assert_eq!(conn.state, EST);
    }

    #[rstest]
    #[case::none(&[], NO_WINDOW_SCALE)]
    #[case::linux_syn(&[2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7], 7)]
    #[case::first_option(&[3, 3, 2], 2)]
    #[case::clamped(&[3, 3, 20], 14)]
    #[case::after_end(&[0, 3, 3, 2], NO_WINDOW_SCALE)]
    #[case::truncated(&[1, 1, 3, 3], NO_WINDOW_SCALE)]
    #[case::zero_length_option(&[8, 0, 3, 3, 2], NO_WINDOW_SCALE)]
    #[case::wrong_length(&[3, 4, 2, 0], NO_WINDOW_SCALE)]
    fn window_scale_option(#[case] options: &[u8], #[case] expected: u8) {
        let mut buffer = [0u8; MAX_OPTIONS_LEN];
        buffer[..options.len()].copy_from_slice(options);
        assert_eq!(window_scale(&buffer, options.len()), expected);
    }

    proptest! {
        #[test]
        fn option_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..=40), len in 0usize..60) {
            let mut buffer = [0u8; MAX_OPTIONS_LEN];
            buffer[..bytes.len()].copy_from_slice(&bytes);
            let scale = window_scale(&buffer, len);
            prop_assert!(scale == NO_WINDOW_SCALE || scale <= MAX_WINDOW_SCALE);
        }

        /// A blind attacker's segment (any sequence number), sent twice,
        /// either is refused or leaves an established flow established.
        #[test]
        fn blind_segments_never_close_an_established_flow(seq in any::<u32>(), ack in any::<u32>(), flags in prop::sample::select(std::vec![RST, RST_ACK, FIN_ACK, ACK, SYN])) {
            let mut conn = Conn::established();
            conn.data(R, 10_000).expect("data");
            let exact = [conn.next[0], conn.next[1]];
            prop_assume!(!exact.contains(&seq));
            let before = (conn.state, conn.fin_seen);
            // Twice: a first guess must not make the second one right.
            let _ = conn.send(R, &seg(flags, seq, ack, 0));
            let result = conn.send(R, &seg(flags, seq, ack, 0));
            if flags & (TCP_FIN) == 0 {
                prop_assert_eq!((conn.state, conn.fin_seen), before, "{:?}", result);
            }
        }
    }

    #[test]
    fn states_in_order_through_a_whole_connection() {
        let mut conn = Conn::established();
        let mut states = Vec::new();
        conn.data(O, 100).expect("request");
        states.push(conn.state);
        conn.data(R, 1000).expect("response");
        states.push(conn.state);
        conn.send(R, &seg(RST_ACK, conn.next[1], conn.next[0], 0)).expect("reset");
        states.push(conn.state);
        assert_eq!(states, [EST, EST, CLOSE]);
    }
}
