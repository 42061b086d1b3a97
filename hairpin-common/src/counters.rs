//! Per-CPU verdict counters: one slot per outcome of the XDP program.

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$doc])* $variant,)* }

        impl Counter {
            pub const ALL: &[Counter] = &[$(Counter::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Counted by the datapath (as opposed to kept by user space).
            pub const fn is_datapath(self) -> bool {
                !matches!(self, Counter::ReclaimedEstablished | Counter::ReclaimedNew)
            }

            /// Stable name, used in logs, stats output and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    /// A LAN client's packet to a public address, sent to the server.
    Hairpinned => "hairpinned",
    /// A WAN client's packet to a published port, sent to the server.
    PortForwarded => "port_forwarded",
    /// A server's reply, sent back to the client as from the public address.
    TranslatedBack => "translated_back",
    /// A new flow was entered into the table of new flows.
    FlowCreated => "flow_created",
    /// A flow became established and moved to the established table.
    FlowEstablished => "flow_established",
    /// The established table was full: the flow stayed among the new ones.
    EstablishedTableFull => "established_table_full",
    /// An idle flow found expired by the datapath and removed.
    FlowExpired => "flow_expired",
    /// An ICMP error of a tracked flow, translated and sent on.
    IcmpTranslated => "icmp_translated",
    /// A packet to a public address too big for the egress link, answered
    /// with ICMP "fragmentation needed".
    FragNeededSent => "frag_needed_sent",
    /// A new flow refused for want of a SNAT port, answered with ICMP
    /// "communication administratively prohibited".
    FlowRefused => "flow_refused",
    /// Turning a packet into an ICMP answer failed; dropped.
    IcmpAnswerFailed => "icmp_answer_failed",
    /// Forwarded packet whose next hop had no resolved MAC yet: handed to
    /// the kernel (TC, `bpf_redirect_neigh`) already translated.
    NeighRedirected => "neigh_redirected",
    /// A route looked up with `bpf_fib_lookup` and cached in the flow's
    /// entry, for its next packets (counted besides the packet's verdict).
    RouteCached => "route_cached",
    PassNotIpv4 => "pass_not_ipv4",
    /// A later fragment of a datagram whose first fragment no flow
    /// translated (or not yet): the kernel gets it untouched.
    PassFragment => "pass_fragment",
    PassNotTcpUdp => "pass_not_tcp_udp",
    PassMalformed => "pass_malformed",
    PassNoMapping => "pass_no_mapping",
    PassSourceNotLan => "pass_source_not_lan",
    PassTcpNotSyn => "pass_tcp_not_syn",
    /// A packet of a flow larger than the egress MTU that could neither be
    /// answered with "fragmentation needed" nor cut into fragments (its
    /// next hop unresolved, IP options, more than 16 pieces): dropped.
    TooBigDropped => "too_big_dropped",
    /// A LAN source address arriving on a WAN interface (spoofed).
    PassLanSourceOnWan => "pass_lan_source_on_wan",
    /// The ingress interface is not one hairpin manages.
    PassUnknownInterface => "pass_unknown_interface",
    /// An ICMP error that belongs to no tracked flow.
    PassIcmpNoFlow => "pass_icmp_no_flow",
    /// A translated packet for the kernel's neighbour resolution that had
    /// no room for the metadata: dropped.
    NoMetadataDropped => "no_metadata_dropped",
    /// No free SNAT source port after the bounded retries.
    PortAllocFailed => "port_alloc_failed",
    /// A packet of a flow with no usable route for its translation
    /// (`bpf_fib_lookup` failed): dropped, never passed untranslated.
    RouteFailed => "route_failed",
    /// Two CPUs opened the same flow at once: the loser's packet is
    /// dropped (passed, it would reach the kernel untranslated).
    FlowRaceDropped => "flow_race_dropped",
    /// Entries user space removed from each table because their flows had
    /// expired (written by user space only, in the first CPU's slot).
    ReclaimedEstablished => "reclaimed_established",
    ReclaimedNew => "reclaimed_new",
    /// Settings map empty: user space has not configured the program.
    PassNotConfigured => "pass_not_configured",
    /// A packet with a tracked flow's tuple on another interface than that
    /// direction's: treated as belonging to no flow, never translated.
    WrongInterface => "wrong_interface",
    /// An entry of the new-flow table whose partner was gone (evicted):
    /// removed, and the packet treated as belonging to no flow.
    FlowOrphaned => "flow_orphaned",
    /// A TCP segment outside its receiver's window (or acknowledging data
    /// never sent): dropped, the flow unchanged.
    TcpOutOfWindow => "tcp_out_of_window",
    /// A TCP segment that breaks the handshake (a SYN-ACK that does not
    /// acknowledge the SYN, data before it): dropped, the flow unchanged.
    TcpHandshakeInvalid => "tcp_handshake_invalid",
    /// A RST inside the window but not at the expected sequence number:
    /// sent on for the endpoint's challenge ACK, the flow unchanged.
    TcpRstNotExact => "tcp_rst_not_exact",
    /// A new WAN flow from a source in the deny set: dropped.
    Denied => "denied",
    /// A new flow from a source outside its mapping's allowlist: to the
    /// kernel, as if the mapping did not exist.
    PassNotAllowed => "pass_not_allowed",
    /// A new flow on an interface its mapping is not bound to: to the
    /// kernel, as if the mapping did not exist.
    PassInterfaceNotAllowed => "pass_interface_not_allowed",
    /// An ICMP message the datapath would generate, over the rate limit:
    /// the packet that called for it is dropped.
    IcmpRateLimited => "icmp_rate_limited",
    /// A later fragment translated as its datagram's first fragment was.
    FragmentTranslated => "fragment_translated",
    /// A later fragment that came before its datagram's first fragment:
    /// held (copied) until that comes, then released with it.
    FragmentHeld => "fragment_held",
    /// A later fragment that came before its first fragment, with its
    /// datagram's queue (or the frame) too full to hold it: dropped.
    FragmentHoldFull => "fragment_hold_full",
    /// A held fragment sent on with its first fragment (by TC), translated
    /// or to the kernel as it came.
    FragmentReleased => "fragment_released",
    /// A packet of a flow too big for its egress link, DF clear, cut into
    /// fragments (by TC) and sent.
    PacketFragmented => "packet_fragmented",
    /// A later fragment larger than its egress MTU: dropped.
    FragmentTooBig => "fragment_too_big",
    /// A packet of a flow whose TTL would expire here, answered with ICMP
    /// "time exceeded" quoting it as it was sent.
    TimeExceededSent => "time_exceeded_sent",
    /// A later fragment or an ICMP error of a flow whose TTL would expire
    /// here: dropped (no ICMP error is sent about either).
    TtlExpiredDropped => "ttl_expired_dropped",
    /// The kernel could not update a translated skb's transport checksum
    /// (TC): dropped rather than sent with a wrong one.
    ChecksumFailed => "checksum_failed",
    /// A packet of a flow too big for its egress link, DF clear, that TC
    /// cannot cut (checksum left to offload, or a GSO aggregate): translated
    /// and handed to the kernel's forwarding, which cuts it.
    FragmentedByKernel => "fragmented_by_kernel",
    /// Such a packet whose translated source is the gateway's own address,
    /// which the kernel does not forward either: answered with
    /// "fragmentation needed" (also counted there) so its sender cuts it.
    TooBigNotCut => "too_big_not_cut",
    /// TC could not pull an skb's headers into its linear part: dropped,
    /// since it could not be told whether it belongs to a flow.
    PullFailed => "pull_failed",
    /// An IPv4 BIG TCP aggregate (a TCP GSO skb over 64 KiB, IPv4 total
    /// length 0): its length taken from the skb (a flow's is translated and
    /// tracked at that length).
    BigTcpAggregate => "big_tcp_aggregate",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_discriminants_index_all() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index, "{} is out of place", counter.name());
        }
    }
}
