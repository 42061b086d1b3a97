//! ICMP: translating the errors of tracked flows, and the "destination
//! unreachable" answers the datapath sends itself (rate-limited).

use hairpin_common::{
    Counter, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Settings, checksum,
    icmp::{self, ICMP_HEADER_LEN, IPPROTO_ICMP},
    nat,
    packet::{
        ETH_HEADER_LEN, ETH_P_IPV4, EthHeader, IPV4_HEADER_LEN, IcmpHeader, Ipv4Header, L4_OFFSET,
        TcpHeader, UdpHeader,
    },
    ratelimit,
};

use crate::{
    conntrack::find_flow,
    context::Packet,
    forward::{Route, fib_lookup, hand_to_kernel, send},
    maps::ICMP_RATE,
    packet::{ptr_at, rewrite_ipv4, set_mac, sum_words},
};

pub(crate) const IP_DONT_FRAGMENT: u16 = 0x4000;
/// Offsets of the TCP and UDP checksum fields in their headers.
pub(crate) const TCP_CHECK_OFFSET: usize = 16;
pub(crate) const UDP_CHECK_OFFSET: usize = 6;

/// An ICMP error about a packet of a tracked flow goes to that packet's
/// sender, its outer and embedded headers translated back (RFC 5508).
/// Errors do not refresh the flow. One that cannot be sent on (no route,
/// too big, TTL spent) is dropped: handed to the kernel, it would go on
/// with the server's address in it.
#[inline(always)]
pub(crate) fn try_icmp_error<C: Packet>(
    ctx: &C,
    icmp_offset: usize,
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked by ptr_at.
    let (outer_src, tot_len, ttl) =
        unsafe { ((*ip).src_addr, u16::from_be((*ip).tot_len), (*ip).ttl) };
    let icmp_header: *mut IcmpHeader = ptr_at(ctx, icmp_offset)?;
    if !icmp::is_error(unsafe { (*icmp_header).icmp_type }) {
        return Err(Counter::PassNotTcpUdp);
    }
    let embedded_ip_offset = icmp_offset + ICMP_HEADER_LEN;
    let inner: *mut Ipv4Header =
        ptr_at(ctx, embedded_ip_offset).map_err(|_| Counter::PassIcmpNoFlow)?;
    let (inner_version_ihl, inner_proto, inner_src, inner_dst) =
        unsafe { ((*inner).version_ihl, (*inner).proto, (*inner).src_addr, (*inner).dst_addr) };
    if inner_version_ihl >> 4 != 4
        || inner_version_ihl & 0x0f < 5
        || (inner_proto != IPPROTO_TCP && inner_proto != IPPROTO_UDP)
    {
        return Err(Counter::PassIcmpNoFlow);
    }
    // The quoted header may carry options too: 20 to 60 bytes, so the
    // embedded ports are at most 128 bytes in.
    let inner_len = core::hint::black_box((inner_version_ihl & 0x0f) as usize * 4) & 0x3c;
    let embedded_l4_offset = (embedded_ip_offset & 0x7f) + inner_len;
    let ports: *mut [u16; 2] =
        ptr_at(ctx, embedded_l4_offset).map_err(|_| Counter::PassIcmpNoFlow)?;
    let [src_port, dst_port] = unsafe { *ports };
    let embedded = FlowKey::new(inner_src, inner_dst, src_port, dst_port, inner_proto);
    // The error comes from where the flow's packets in the other direction
    // come from: the same interface binding applies.
    let ingress = ctx.ingress();
    let flow = find_flow(&embedded.reversed(), ingress, settings, now)?
        .flow()
        .ok_or(Counter::PassIcmpNoFlow)?;
    if nat::ttl_expires(ttl) {
        return Ok((C::DROP, Counter::TtlExpiredDropped));
    }
    let translated = unsafe { (*flow.entry).translated };
    let rewrite = icmp::error_rewrite(outer_src, &embedded, &translated);
    let outer_to = FlowKey::new(rewrite.outer_src, rewrite.outer_dst, 0, 0, IPPROTO_ICMP);
    let route = match fib_lookup(ctx, &outer_to, tot_len) {
        Ok((Route::TooBig { .. }, _)) => {
            return Ok((C::DROP, Counter::TooBigDropped));
        }
        Ok((route, _)) => route,
        Err(failed) => return Ok((C::DROP, failed)),
    };
    if let Route::Unresolved { ifindex } = route
        && let Err(failed) = hand_to_kernel(ctx, ifindex)
    {
        return Ok((C::DROP, failed));
    }

    // hand_to_kernel may have moved the packet: look everything up again.
    let eth: *mut EthHeader = ptr_at(ctx, 0)?;
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    let icmp_header: *mut IcmpHeader = ptr_at(ctx, icmp_offset)?;
    let inner: *mut Ipv4Header = ptr_at(ctx, embedded_ip_offset)?;
    let ports: *mut [u16; 2] = ptr_at(ctx, embedded_l4_offset)?;
    // The embedded transport checksum, when the error quotes that far.
    let l4_check: Option<*mut u16> = if inner_proto == IPPROTO_UDP {
        ptr_at::<UdpHeader>(ctx, embedded_l4_offset)
            .ok()
            .map(|udp| unsafe { &raw mut (*udp).check })
    } else {
        ptr_at::<TcpHeader>(ctx, embedded_l4_offset)
            .ok()
            .map(|tcp| unsafe { &raw mut (*tcp).check })
    };
    let to = rewrite.embedded;
    unsafe {
        let old_ip_check = (*inner).check;
        let mut new_ip_check = checksum::replace_u32(old_ip_check, embedded.src_addr, to.src_addr);
        new_ip_check = checksum::replace_u32(new_ip_check, embedded.dst_addr, to.dst_addr);
        let (old_l4_check, new_l4_check) = match l4_check {
            Some(check) => {
                let old = *check;
                let new =
                    checksum::l4_after_rewrite(old, &embedded, &to, inner_proto == IPPROTO_UDP);
                *check = new;
                (old, new)
            }
            None => (0, 0),
        };
        (*icmp_header).check = icmp::checksum_after(
            (*icmp_header).check,
            &embedded,
            &to,
            (old_ip_check, new_ip_check),
            (old_l4_check, new_l4_check),
        );
        (*inner).check = new_ip_check;
        (*inner).src_addr = to.src_addr;
        (*inner).dst_addr = to.dst_addr;
        *ports = [to.src_port, to.dst_port];
        let outer_from = FlowKey::new((*ip).src_addr, (*ip).dst_addr, 0, 0, IPPROTO_ICMP);
        rewrite_ipv4(&mut *ip, &outer_from, &outer_to);
        send::<C>(&mut *eth, &route, Counter::IcmpTranslated)
    }
}

/// A packet of a flow too big for the egress link, with DF set (one
/// without is cut into fragments instead): answered with "fragmentation
/// needed" from the address its sender used (the public address) or from
/// the gateway's LAN address (a server's packet). Handed to the kernel, a
/// packet to the public address or to the gateway's LAN address would be
/// taken as the gateway's own.
#[inline(always)]
pub(crate) fn too_big(
    ctx: &impl Packet,
    mtu: u16,
    (to_public_address, ip_len): (bool, u16),
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let answer = (icmp::ICMP_DEST_UNREACH, icmp::ICMP_FRAG_NEEDED, mtu, Counter::FragNeededSent);
    answer_flow_packet(ctx, answer, (to_public_address, ip_len), settings, now)
}

/// A packet of a flow whose TTL would expire here: answered with "time
/// exceeded" quoting it as its sender sent it, from the address it used
/// (as netfilter translates the kernel's answer).
#[inline(always)]
pub(crate) fn time_exceeded(
    ctx: &impl Packet,
    (to_public_address, ip_len): (bool, u16),
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let answer = (icmp::ICMP_TIME_EXCEEDED, 0, 0, Counter::TimeExceededSent);
    answer_flow_packet(ctx, answer, (to_public_address, ip_len), settings, now)
}

/// Answers a packet of a flow with the ICMP error `(type, code, mtu,
/// counter)`, from the address its sender used (the public address) or
/// from the gateway's LAN address (a server's packet).
#[inline(always)]
fn answer_flow_packet(
    ctx: &impl Packet,
    (icmp_type, code, mtu, counter): (u8, u8, u16, Counter),
    (to_public_address, ip_len): (bool, u16),
    settings: &Settings,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked.
    let dst_addr = unsafe { (*ip).dst_addr };
    let answer = IcmpAnswer {
        icmp_type,
        code,
        mtu,
        from_addr: icmp::answer_source(to_public_address, dst_addr, settings.lan_addr),
        tot_len: ip_len,
        counter,
    };
    answer_icmp(ctx, &answer, now)
}

/// An ICMP error to send in answer to a packet.
#[derive(Clone, Copy)]
pub(crate) struct IcmpAnswer {
    pub(crate) icmp_type: u8,
    pub(crate) code: u8,
    /// The next-hop MTU, for "fragmentation needed".
    pub(crate) mtu: u16,
    pub(crate) from_addr: u32,
    /// The answered packet's IPv4 total length.
    pub(crate) tot_len: u16,
    /// The verdict counted when the answer goes out.
    pub(crate) counter: Counter,
}

/// Turns the packet into the ICMP error `answer` to its sender: the
/// received IPv4 header and 8 bytes after it are quoted, the rest cut off,
/// and it goes back out where it came from. Over the ICMP rate limit, the
/// packet is dropped instead; so is a packet with IP options (whose quote
/// would be longer).
///
/// An skb whose transport checksum is left to offload (CHECKSUM_PARTIAL,
/// from a local sender: a container or VM) keeps that: the kernel or the
/// device completes the field over the bytes from the transport header on,
/// which are now the quote's. The quote then keeps the whole field (20
/// bytes of a TCP header), and the ICMP checksum covers the field as it
/// will be completed.
#[inline(always)]
pub(crate) fn answer_icmp<C: Packet>(
    ctx: &C,
    answer: &IcmpAnswer,
    now: u64,
) -> Result<(u32, Counter), Counter> {
    let ip: *mut Ipv4Header = ptr_at(ctx, ETH_HEADER_LEN)?;
    // SAFETY: bounds checked.
    let (version_ihl, proto) = unsafe { ((*ip).version_ihl, (*ip).proto) };
    if version_ihl != 0x45 {
        return Ok((C::DROP, Counter::IcmpAnswerFailed));
    }
    let Some(bucket) = ICMP_RATE.get_ptr_mut(0) else {
        return Ok((C::DROP, Counter::IcmpRateLimited));
    };
    // SAFETY: this CPU's bucket; a program runs to completion on a CPU.
    if !ratelimit::take(unsafe { &mut *bucket }, now) {
        return Ok((C::DROP, Counter::IcmpRateLimited));
    }
    let offloaded = match proto {
        IPPROTO_TCP => ctx.checksum_offloaded(L4_OFFSET + TCP_CHECK_OFFSET),
        IPPROTO_UDP => ctx.checksum_offloaded(L4_OFFSET + UDP_CHECK_OFFSET),
        _ => false,
    };
    match (offloaded, proto) {
        (true, IPPROTO_TCP) => quote_and_answer::<C, 40, 24, 10>(ctx, answer, true),
        (true, _) => quote_and_answer::<C, 28, 18, 4>(ctx, answer, true),
        _ => quote_and_answer::<C, 28, 18, 4>(ctx, answer, false),
    }
}

/// `answer_icmp` quoting `QUOTE_LEN` bytes (the IPv4 header and
/// `L4_WORDS` 16-bit words after it); `ICMP_WORDS` is the ICMP message's
/// length in words.
#[inline(always)]
fn quote_and_answer<
    C: Packet,
    const QUOTE_LEN: usize,
    const ICMP_WORDS: usize,
    const L4_WORDS: usize,
>(
    ctx: &C,
    answer: &IcmpAnswer,
    offloaded: bool,
) -> Result<(u32, Counter), Counter> {
    const { assert!(ICMP_WORDS * 2 == ICMP_HEADER_LEN + QUOTE_LEN) };
    const { assert!(L4_WORDS * 2 + IPV4_HEADER_LEN == QUOTE_LEN) };
    let IcmpAnswer { icmp_type, code, mtu, from_addr, tot_len, counter } = *answer;
    const PREPENDED: usize = IPV4_HEADER_LEN + ICMP_HEADER_LEN;
    const QUOTE: usize = PREPENDED + ETH_HEADER_LEN;
    let frame_len = ETH_HEADER_LEN as i32 + tot_len as i32;
    let keep = (ETH_HEADER_LEN + QUOTE_LEN) as i32;
    if frame_len < keep {
        return Ok((C::DROP, Counter::IcmpAnswerFailed));
    }
    // Once reshaped, the packet is half an answer: anything failing now
    // drops it rather than pass it on.
    let Some(old_eth) = ctx.reshape(frame_len, keep, PREPENDED as i32) else {
        return Ok((C::DROP, Counter::IcmpAnswerFailed));
    };
    let headers = || -> Result<_, Counter> {
        Ok((
            ptr_at::<EthHeader>(ctx, 0)?,
            ptr_at::<EthHeader>(ctx, old_eth & 0x1f)?,
            ptr_at::<Ipv4Header>(ctx, ETH_HEADER_LEN)?,
            ptr_at::<IcmpHeader>(ctx, L4_OFFSET)?,
            ptr_at::<Ipv4Header>(ctx, QUOTE)?,
            ptr_at::<[u16; ICMP_WORDS]>(ctx, L4_OFFSET)?,
            ptr_at::<[u16; L4_WORDS]>(ctx, QUOTE + IPV4_HEADER_LEN)?,
        ))
    };
    let Ok((new_eth, old_eth, ip, icmp_header, quoted, icmp_words, quoted_l4)) = headers() else {
        return Ok((C::DROP, Counter::IcmpAnswerFailed));
    };
    unsafe {
        // Read before written: the received header may be where the new
        // one goes (TC), or overlap the new IPv4 header (XDP).
        let (sender_mac, own_mac) = ((*old_eth).src, (*old_eth).dst);
        set_mac(&mut (*new_eth).dst, &sender_mac);
        set_mac(&mut (*new_eth).src, &own_mac);
        (*new_eth).ether_type = ETH_P_IPV4.to_be();
        let sender = (*quoted).src_addr;
        *ip = icmp::answer_ipv4_header(from_addr, sender, (ICMP_WORDS * 2) as u16);
        *icmp_header = icmp::answer_icmp_header(icmp_type, code, mtu);
        let mut check = !checksum::fold(sum_words(&*icmp_words));
        if offloaded {
            // The field's word is the last of the quoted UDP header and the
            // ninth of the TCP one; completed, it is the checksum of the
            // quoted transport bytes.
            let field = (*quoted_l4)[if L4_WORDS == 4 { 3 } else { 8 }];
            let completed = !checksum::fold(sum_words(&*quoted_l4));
            check = icmp::check_with_completed_quote(check, field, completed);
        }
        (*icmp_header).check = check;
    }
    Ok((ctx.tx(), counter))
}
