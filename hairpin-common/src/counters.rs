//! Per-CPU verdict counters: one slot per outcome of the XDP program.

macro_rules! counters {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$doc])* $variant,)* }

        impl Counter {
            pub const ALL: &[Counter] = &[$(Counter::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

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
    /// A server's reply, sent back to the client as from the public address.
    TranslatedBack => "translated_back",
    /// A new hairpin flow was entered into conntrack.
    FlowCreated => "flow_created",
    /// Forwarded packet whose next hop had no resolved MAC yet: handed to
    /// the kernel (TC, `bpf_redirect_neigh`) already translated.
    NeighRedirected => "neigh_redirected",
    PassNotIpv4 => "pass_not_ipv4",
    PassIpOptions => "pass_ip_options",
    PassFragment => "pass_fragment",
    PassNotTcpUdp => "pass_not_tcp_udp",
    PassMalformed => "pass_malformed",
    PassNoMapping => "pass_no_mapping",
    PassSourceNotLan => "pass_source_not_lan",
    PassTcpNotSyn => "pass_tcp_not_syn",
    PassTtlExpired => "pass_ttl_expired",
    /// Metadata could not be attached for the kernel hand-off.
    PassNoMetadata => "pass_no_metadata",
    /// No free SNAT source port after the bounded retries.
    PortAllocFailed => "port_alloc_failed",
    /// `bpf_fib_lookup` found no usable route (packet passed untouched).
    FibFailed => "fib_failed",
    /// The route leaves through an interface hairpin does not manage.
    PassEgressNotManaged => "pass_egress_not_managed",
    /// Two CPUs opened the same flow at once; the loser's packet is passed.
    PassFlowRace => "pass_flow_race",
    /// Settings map empty: user space has not configured the program.
    PassNotConfigured => "pass_not_configured",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_discriminants_index_all() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(
                *counter as usize,
                index,
                "{} is out of place",
                counter.name()
            );
        }
    }
}
