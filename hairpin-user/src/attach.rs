//! Which hook the datapath runs in on an interface: native XDP or the TC
//! ingress classifier, decided from what the kernel says of the device
//! ([`LinkFacts`], gathered by [`crate::netlink`]) and what the
//! configuration asks ([`AttachMode`]).
//!
//! Generic (skb) XDP is never chosen: it breaks GRO aggregates and
//! offloaded (CHECKSUM_PARTIAL) checksums; TC serves those devices instead.

use std::fmt;

use hairpin_common::maps::programs;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::AttachMode;

/// `ARPHRD_ETHER` (linux/if_arp.h): the link type of devices with an
/// Ethernet header.
pub const ARPHRD_ETHER: u16 = 1;

/// `enum netdev_xdp_act` (linux/netdev.h): what a driver's native XDP can do.
pub mod xdp_act {
    /// XDP_ABORTED, XDP_DROP, XDP_PASS and XDP_TX.
    pub const BASIC: u64 = 1;
    pub const REDIRECT: u64 = 2;
    /// `ndo_xdp_xmit`: frames redirected into the device are sent. A veth
    /// has it only while its peer runs XDP or has GRO on
    /// (`veth_set_xdp_features`); without it they are dropped.
    pub const NDO_XMIT: u64 = 4;
    pub const XSK_ZEROCOPY: u64 = 8;
    pub const HW_OFFLOAD: u64 = 16;
    pub const RX_SG: u64 = 32;
    pub const NDO_XMIT_SG: u64 = 64;
}

/// The device's XDP features, as the `netdev` generic netlink family
/// reports them (`dev-get`, `xdp-features`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpFeatures {
    Known(u64),
    /// The query failed (kernels before 6.3 have no `netdev` family): why.
    Unknown(String),
}

/// What the kernel says of an interface, as far as the choice goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    /// `ARPHRD_*`: [`ARPHRD_ETHER`] for devices with an Ethernet header.
    pub link_type: u16,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, `vlan`...); `None` for a
    /// physical device.
    pub kind: Option<String>,
    pub xdp_features: XdpFeatures,
    /// Whether XDP on another managed interface may redirect into this one.
    pub redirect_target: bool,
}

impl LinkFacts {
    fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }

    /// A tap (a VM's NIC on the host): `tun` with an Ethernet header.
    fn is_tap(&self) -> bool {
        self.kind.as_deref() == Some("tun") && self.link_type == ARPHRD_ETHER
    }
}

/// The hook the datapath runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// Native (driver) XDP, with the TC hand-off classifier next to it.
    Xdp,
    /// The whole datapath in the TC ingress classifier.
    Tc,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "XDP native",
            Hook::Tc => "TC",
        })
    }
}

/// Whether the hook was configured or chosen by `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChosenBy {
    Configured,
    Auto,
}

/// Where an interface's datapath runs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub hook: Hook,
    /// Whether the device has an Ethernet header (else TC pushes one).
    pub ethernet: bool,
    pub chosen_by: ChosenBy,
    /// Why `auto` chose the hook; empty when configured.
    pub reason: String,
    /// `auto` without the device's XDP features: XDP if a native attach
    /// works, else TC for [`NO_NATIVE_XDP`].
    pub tc_if_native_xdp_fails: bool,
    /// What the operator should know about a configured hook.
    pub warning: Option<String>,
}

pub const NO_ETHERNET_HEADER: &str = "no Ethernet header";
pub const VETH_PEER_CANNOT_TAKE_XDP: &str =
    "veth peer cannot take XDP frames (no XDP program or GRO on the peer)";
/// Why a veth or a tap gets TC even where XDP frames would be delivered:
/// seen on a veth whose peer has GRO, every translated TCP segment was
/// dropped by the receiver as a checksum error.
pub const OFFLOADED_CHECKSUMS: &str = "local senders leave checksums to offload \
     (CHECKSUM_PARTIAL), which XDP cannot complete";
pub const NO_NATIVE_XDP: &str = "driver has no native XDP";
pub const NO_XDP_TRANSMIT: &str = "driver cannot send redirected XDP frames (no ndo_xdp_xmit)";
pub const NATIVE_XDP: &str = "driver has native XDP";
pub const NATIVE_XDP_ATTACHED: &str = "native XDP attach worked (the driver reports no features)";

impl Decision {
    /// The classifier on TC ingress: the hand-off helper next to XDP, or
    /// the whole datapath.
    pub fn tc_program(&self) -> &'static str {
        match (self.hook, self.ethernet) {
            (Hook::Xdp, _) => programs::TC_INGRESS,
            (Hook::Tc, true) => programs::TC,
            (Hook::Tc, false) => programs::TC_L3,
        }
    }

    /// The program that sees the interface's packets first.
    pub fn program(&self) -> &'static str {
        match self.hook {
            Hook::Xdp => programs::XDP,
            Hook::Tc => self.tc_program(),
        }
    }

    /// `auto` fell back to TC: the native attach failed.
    pub fn fall_back_to_tc(&mut self, why: &str) {
        self.hook = Hook::Tc;
        self.reason = format!("{NO_NATIVE_XDP} ({why})");
        self.tc_if_native_xdp_fails = false;
    }

    /// `auto` got native XDP without knowing the features.
    pub fn native_xdp_worked(&mut self) {
        self.reason = NATIVE_XDP_ATTACHED.into();
        self.tc_if_native_xdp_fails = false;
    }

    /// How status and the log show it: `TC (auto: no Ethernet header)`,
    /// `XDP native (configured)`.
    pub fn describe(&self) -> String {
        describe(self.hook, self.chosen_by, &self.reason)
    }
}

/// [`Decision::describe`] from its parts.
pub fn describe(hook: Hook, chosen_by: ChosenBy, reason: &str) -> String {
    match (chosen_by, reason.is_empty()) {
        (ChosenBy::Configured, _) => format!("{hook} (configured)"),
        (ChosenBy::Auto, false) => format!("{hook} (auto: {reason})"),
        (ChosenBy::Auto, true) => format!("{hook} (auto)"),
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AttachError {
    #[error(
        "interface `{interface}` has no Ethernet header (link type {link_type}): XDP cannot serve it; \
         attach it with `tc` (`[datapath.interfaces] {interface} = \"tc\"`)"
    )]
    XdpWithoutEthernet { interface: String, link_type: u16 },
}

/// Where `interface`'s datapath runs, given what the configuration asks and
/// what the kernel says of the device.
pub fn decide(
    interface: &str,
    mode: AttachMode,
    facts: &LinkFacts,
) -> Result<Decision, AttachError> {
    let ethernet = facts.link_type == ARPHRD_ETHER;
    let decision = |hook, chosen_by, reason: &str| Decision {
        hook,
        ethernet,
        chosen_by,
        reason: reason.to_string(),
        tc_if_native_xdp_fails: false,
        warning: None,
    };
    match mode {
        AttachMode::Tc => Ok(decision(Hook::Tc, ChosenBy::Configured, "")),
        AttachMode::Xdp if !ethernet => Err(AttachError::XdpWithoutEthernet {
            interface: interface.into(),
            link_type: facts.link_type,
        }),
        AttachMode::Xdp => {
            let mut configured = decision(Hook::Xdp, ChosenBy::Configured, "");
            if facts.is_veth() && !veth_takes_xdp_frames(&facts.xdp_features) {
                configured.warning = Some(format!(
                    "{interface}: XDP as configured, but its {VETH_PEER_CANNOT_TAKE_XDP}: \
                     the packets XDP sends out of it are lost (`tc` would serve it)"
                ));
            } else if facts.is_veth() || facts.is_tap() {
                configured.warning = Some(format!(
                    "{interface}: XDP as configured; {OFFLOADED_CHECKSUMS}: \
                     only senders with tx checksum offload off are translated right \
                     (`tc` would serve every sender)"
                ));
            }
            Ok(configured)
        }
        AttachMode::Auto if !ethernet => Ok(decision(Hook::Tc, ChosenBy::Auto, NO_ETHERNET_HEADER)),
        AttachMode::Auto if facts.is_veth() || facts.is_tap() => {
            let kind = if facts.is_veth() { "veth" } else { "tap" };
            let reason = match &facts.xdp_features {
                XdpFeatures::Known(features) if features & xdp_act::NDO_XMIT == 0 => {
                    format!("{kind}: {VETH_PEER_CANNOT_TAKE_XDP}, and {OFFLOADED_CHECKSUMS}")
                }
                _ => format!("{kind}: {OFFLOADED_CHECKSUMS}"),
            };
            Ok(decision(Hook::Tc, ChosenBy::Auto, &reason))
        }
        AttachMode::Auto => Ok(match &facts.xdp_features {
            XdpFeatures::Known(features) => {
                let needed = xdp_act::BASIC | xdp_act::REDIRECT;
                if features & needed != needed {
                    decision(Hook::Tc, ChosenBy::Auto, NO_NATIVE_XDP)
                } else if facts.redirect_target && features & xdp_act::NDO_XMIT == 0 {
                    decision(Hook::Tc, ChosenBy::Auto, NO_XDP_TRANSMIT)
                } else {
                    decision(Hook::Xdp, ChosenBy::Auto, NATIVE_XDP)
                }
            }
            XdpFeatures::Unknown(_) => {
                Decision { tc_if_native_xdp_fails: true, ..decision(Hook::Xdp, ChosenBy::Auto, "") }
            }
        }),
    }
}

fn veth_takes_xdp_frames(features: &XdpFeatures) -> bool {
    matches!(features, XdpFeatures::Known(f) if f & xdp_act::NDO_XMIT != 0)
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    const VETH_WITHOUT_PEER_XDP: u64 = xdp_act::BASIC | xdp_act::REDIRECT | xdp_act::RX_SG;
    const VETH_WITH_PEER_XDP: u64 =
        VETH_WITHOUT_PEER_XDP | xdp_act::NDO_XMIT | xdp_act::NDO_XMIT_SG;
    const FULL_DRIVER: u64 = xdp_act::BASIC | xdp_act::REDIRECT | xdp_act::NDO_XMIT;
    const ARPHRD_NONE: u16 = 0xfffe;
    const ARPHRD_PPP: u16 = 512;

    fn facts(link_type: u16, kind: Option<&str>, features: Option<u64>) -> LinkFacts {
        LinkFacts {
            link_type,
            kind: kind.map(str::to_string),
            xdp_features: match features {
                Some(f) => XdpFeatures::Known(f),
                None => XdpFeatures::Unknown("no netdev family".into()),
            },
            redirect_target: true,
        }
    }

    #[rstest]
    #[case::wireguard(ARPHRD_NONE, Some("wireguard"), Some(0), Hook::Tc, NO_ETHERNET_HEADER)]
    #[case::ppp(ARPHRD_PPP, Some("ppp"), None, Hook::Tc, NO_ETHERNET_HEADER)]
    #[case::tun_with_xdp(ARPHRD_NONE, Some("tun"), Some(FULL_DRIVER), Hook::Tc, NO_ETHERNET_HEADER)]
    #[case::veth_plain_peer(
        ARPHRD_ETHER,
        Some("veth"),
        Some(VETH_WITHOUT_PEER_XDP),
        Hook::Tc,
        VETH_PEER_CANNOT_TAKE_XDP
    )]
    #[case::veth_peer_with_xdp(
        ARPHRD_ETHER,
        Some("veth"),
        Some(VETH_WITH_PEER_XDP),
        Hook::Tc,
        OFFLOADED_CHECKSUMS
    )]
    #[case::tap(ARPHRD_ETHER, Some("tun"), Some(FULL_DRIVER), Hook::Tc, OFFLOADED_CHECKSUMS)]
    #[case::veth_features_unknown(ARPHRD_ETHER, Some("veth"), None, Hook::Tc, OFFLOADED_CHECKSUMS)]
    #[case::nic_with_xdp(ARPHRD_ETHER, None, Some(FULL_DRIVER | xdp_act::RX_SG), Hook::Xdp, NATIVE_XDP)]
    #[case::nic_without_xdp(ARPHRD_ETHER, None, Some(0), Hook::Tc, NO_NATIVE_XDP)]
    #[case::nic_basic_only(ARPHRD_ETHER, None, Some(xdp_act::BASIC), Hook::Tc, NO_NATIVE_XDP)]
    #[case::nic_without_xmit(
        ARPHRD_ETHER,
        None,
        Some(xdp_act::BASIC | xdp_act::REDIRECT),
        Hook::Tc,
        NO_XDP_TRANSMIT
    )]
    #[case::bridge(ARPHRD_ETHER, Some("bridge"), Some(0), Hook::Tc, NO_NATIVE_XDP)]
    fn auto_decides_from_the_facts(
        #[case] link_type: u16,
        #[case] kind: Option<&str>,
        #[case] features: Option<u64>,
        #[case] hook: Hook,
        #[case] reason: &str,
    ) {
        let facts = facts(link_type, kind, features);
        let decision = decide("eth0", AttachMode::Auto, &facts).expect("auto always decides");
        assert_eq!((decision.hook, decision.chosen_by), (hook, ChosenBy::Auto), "{facts:?}");
        assert!(decision.reason.contains(reason), "{:?} for {facts:?}", decision.reason);
        assert!(!decision.tc_if_native_xdp_fails);
        assert_eq!(decision.warning, None);
        assert_eq!(decision.ethernet, link_type == ARPHRD_ETHER);
    }

    #[test]
    fn a_nic_without_known_features_gets_xdp_if_the_native_attach_works() {
        let facts = facts(ARPHRD_ETHER, None, None);
        let mut decision = decide("eth0", AttachMode::Auto, &facts).expect("decides");
        assert_eq!(decision.hook, Hook::Xdp);
        assert!(decision.tc_if_native_xdp_fails);
        let mut worked = decision.clone();
        worked.native_xdp_worked();
        assert_eq!((worked.hook, worked.reason.as_str()), (Hook::Xdp, NATIVE_XDP_ATTACHED));
        decision.fall_back_to_tc("Operation not supported");
        assert_eq!(decision.hook, Hook::Tc);
        assert_eq!(decision.program(), programs::TC);
        assert_eq!(
            decision.describe(),
            "TC (auto: driver has no native XDP (Operation not supported))"
        );
    }

    #[test]
    fn a_nic_that_is_no_redirect_target_needs_no_xdp_transmit() {
        let mut facts = facts(ARPHRD_ETHER, None, Some(xdp_act::BASIC | xdp_act::REDIRECT));
        facts.redirect_target = false;
        let decision = decide("eth0", AttachMode::Auto, &facts).expect("decides");
        assert_eq!(decision.hook, Hook::Xdp);
    }

    #[rstest]
    #[case::tc_on_ethernet(AttachMode::Tc, ARPHRD_ETHER, Some(FULL_DRIVER), Ok((Hook::Tc, programs::TC)))]
    #[case::tc_on_wireguard(AttachMode::Tc, ARPHRD_NONE, None, Ok((Hook::Tc, programs::TC_L3)))]
    #[case::xdp_on_a_nic(AttachMode::Xdp, ARPHRD_ETHER, Some(0), Ok((Hook::Xdp, programs::XDP)))]
    #[case::xdp_on_wireguard(AttachMode::Xdp, ARPHRD_NONE, Some(0), Err(()))]
    fn configured_modes(
        #[case] mode: AttachMode,
        #[case] link_type: u16,
        #[case] features: Option<u64>,
        #[case] expected: Result<(Hook, &str), ()>,
    ) {
        let facts = facts(link_type, None, features);
        match (decide("wg0", mode, &facts), expected) {
            (Ok(decision), Ok((hook, program))) => {
                assert_eq!((decision.hook, decision.program()), (hook, program));
                assert_eq!(decision.chosen_by, ChosenBy::Configured);
                assert!(decision.describe().ends_with("(configured)"), "{}", decision.describe());
            }
            (Err(error), Err(())) => {
                let text = error.to_string();
                assert!(text.contains("`wg0`") && text.contains("tc"), "{text}");
            }
            (got, wanted) => panic!("got {got:?}, expected {wanted:?}"),
        }
    }

    #[rstest]
    #[case::peer_without_xdp(Some(VETH_WITHOUT_PEER_XDP), VETH_PEER_CANNOT_TAKE_XDP)]
    #[case::features_unknown(None, VETH_PEER_CANNOT_TAKE_XDP)]
    #[case::peer_with_xdp(Some(VETH_WITH_PEER_XDP), OFFLOADED_CHECKSUMS)]
    fn configured_xdp_on_a_veth_warns_what_it_loses(
        #[case] features: Option<u64>,
        #[case] warning: &str,
    ) {
        let facts = facts(ARPHRD_ETHER, Some("veth"), features);
        let decision = decide("gw-lan", AttachMode::Xdp, &facts).expect("xdp on a veth is allowed");
        assert_eq!(decision.hook, Hook::Xdp);
        let said = decision.warning.expect("a warning");
        assert!(said.contains(warning), "{said}");
    }

    #[test]
    fn descriptions() {
        assert_eq!(
            describe(Hook::Tc, ChosenBy::Auto, "veth peer cannot take XDP frames"),
            "TC (auto: veth peer cannot take XDP frames)"
        );
        assert_eq!(describe(Hook::Xdp, ChosenBy::Configured, ""), "XDP native (configured)");
        // The classifier next to XDP is the hand-off helper.
        let facts = facts(ARPHRD_ETHER, None, Some(FULL_DRIVER));
        let decision = decide("eth0", AttachMode::Auto, &facts).expect("decides");
        assert_eq!(decision.tc_program(), programs::TC_INGRESS);
    }
}
