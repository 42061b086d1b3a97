//! What the kernel says of an interface, asked over netlink: its link type
//! and kind (rtnetlink), its XDP features (the `netdev` generic netlink
//! family), the XDP program attached to it, and the route to an address.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkDeserializable,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla, NlaBuffer,
    NlasIterator, Parseable, ParseableParametrized, emit_u32, parse_u32, parse_u64,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage, LinkXdp, XdpAttached},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols};
use thiserror::Error;

use crate::attach::{LinkFacts, XdpFeatures};

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink: {0}")]
    Kernel(io::Error),
    #[error("netlink answer: {0}")]
    Decode(#[from] DecodeError),
    #[error("no answer about interface {0}")]
    NoLink(u32),
    #[error("the kernel has no `{0}` generic netlink family")]
    NoFamily(&'static str),
}

/// An interface as rtnetlink shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// `ARPHRD_*`.
    pub link_type: u16,
    /// `IFLA_INFO_KIND`, `None` for a physical device.
    pub kind: Option<String>,
    /// How XDP is attached to it now, if it is.
    pub xdp_attached: Option<XdpAttachMode>,
}

/// `XDP_ATTACHED_*`, for the modes hairpin cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    Driver,
    /// Generic (skb) XDP.
    Skb,
    Other,
}

/// The link type, kind and XDP state of interface `if_index`.
pub fn link(if_index: u32) -> Result<Link, NetlinkError> {
    let mut request = LinkMessage::default();
    request.header.index = if_index;
    let answers = request_route(RouteNetlinkMessage::GetLink(request), NLM_F_REQUEST)?;
    let message = answers
        .into_iter()
        .find_map(|answer| match answer {
            RouteNetlinkMessage::NewLink(link) if link.header.index == if_index => Some(link),
            _ => None,
        })
        .ok_or(NetlinkError::NoLink(if_index))?;
    let mut link =
        Link { link_type: message.header.link_layer_type.into(), kind: None, xdp_attached: None };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(InfoKind::Other(kind)) => Some(kind.clone()),
                    LinkInfo::Kind(kind) => Some(kind.to_string()),
                    _ => None,
                });
            }
            LinkAttribute::Xdp(xdp) => {
                link.xdp_attached = xdp.iter().find_map(|x| match x {
                    LinkXdp::Attached(XdpAttached::None) => None,
                    LinkXdp::Attached(XdpAttached::Driver) => Some(XdpAttachMode::Driver),
                    LinkXdp::Attached(XdpAttached::SocketBuffer) => Some(XdpAttachMode::Skb),
                    LinkXdp::Attached(_) => Some(XdpAttachMode::Other),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Ok(link)
}

/// What the kernel says of `if_index`, for [`crate::attach::decide`]; XDP
/// features it cannot tell are [`XdpFeatures::Unknown`], not an error.
pub fn link_facts(if_index: u32, redirect_target: bool) -> Result<LinkFacts, NetlinkError> {
    let link = link(if_index)?;
    let xdp_features = match xdp_features(if_index) {
        Ok(features) => XdpFeatures::Known(features),
        Err(error) => XdpFeatures::Unknown(error.to_string()),
    };
    Ok(LinkFacts { link_type: link.link_type, kind: link.kind, xdp_features, redirect_target })
}

/// The interface the main routing decision sends packets for `dst` out of.
pub fn route_out_interface(dst: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    request.header.destination_prefix_length = 32;
    request.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    let answers = request_route(RouteNetlinkMessage::GetRoute(request), NLM_F_REQUEST)?;
    Ok(answers.into_iter().find_map(|answer| match answer {
        RouteNetlinkMessage::NewRoute(route) => route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        }),
        _ => None,
    }))
}

/// `xdp-features` of interface `if_index` (`enum netdev_xdp_act` bits).
pub fn xdp_features(if_index: u32) -> Result<u64, NetlinkError> {
    let family = genl_family_id(NetdevMessage::family_name())?;
    let mut message = GenlMessage::from_payload(NetdevMessage {
        command: NETDEV_CMD_DEV_GET,
        attributes: vec![NetdevAttribute::IfIndex(if_index)],
    });
    message.set_resolved_family_id(family);
    let answers = request(protocols::NETLINK_GENERIC, message, NLM_F_REQUEST)?;
    answers
        .iter()
        .flat_map(|answer| &answer.payload.attributes)
        .find_map(|attribute| match attribute {
            NetdevAttribute::XdpFeatures(features) => Some(*features),
            _ => None,
        })
        .ok_or(NetlinkError::NoLink(if_index))
}

fn genl_family_id(name: &'static str) -> Result<u16, NetlinkError> {
    let message = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.into())],
    });
    let answers = match request(protocols::NETLINK_GENERIC, message, NLM_F_REQUEST) {
        Ok(answers) => answers,
        Err(NetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(NetlinkError::NoFamily(name));
        }
        Err(e) => return Err(e),
    };
    answers
        .iter()
        .flat_map(|answer| &answer.payload.nlas)
        .find_map(|nla| match nla {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .ok_or(NetlinkError::NoFamily(name))
}

/// Sets `attributes` of interface `if_index` (RTM_SETLINK), in the
/// caller's network namespace.
pub fn set_link_attributes(
    if_index: u32,
    attributes: Vec<LinkAttribute>,
) -> Result<(), NetlinkError> {
    let mut request = LinkMessage::default();
    request.header.index = if_index;
    request.attributes = attributes;
    request_route(RouteNetlinkMessage::SetLink(request), NLM_F_REQUEST)?;
    Ok(())
}

fn request_route(
    message: RouteNetlinkMessage,
    flags: u16,
) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
    request(protocols::NETLINK_ROUTE, message, flags)
}

/// Sends one request with NLM_F_ACK and collects the answers until the
/// kernel's ACK (or the end of a dump).
fn request<T>(protocol: isize, payload: T, flags: u16) -> Result<Vec<T>, NetlinkError>
where
    T: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let mut socket = Socket::new(protocol).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(NetlinkError::Socket)?;
    let mut header = NetlinkHeader::default();
    header.flags = flags | NLM_F_ACK;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    message.finalize();
    let mut buffer = vec![0u8; message.buffer_len()];
    message.serialize(&mut buffer);
    socket.send(&buffer, 0).map_err(NetlinkError::Socket)?;

    let mut answers = Vec::new();
    loop {
        let (received, _) = socket.recv_from_full().map_err(NetlinkError::Socket)?;
        let mut offset = 0;
        while offset < received.len() {
            let answer = NetlinkMessage::<T>::deserialize(&received[offset..])?;
            let length = answer.header.length as usize;
            match answer.payload {
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        Some(_) => Err(NetlinkError::Kernel(error.to_io())),
                        None => Ok(answers),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(answers),
                _ => {}
            }
            if length == 0 {
                return Ok(answers);
            }
            offset += length;
        }
    }
}

/// `linux/netdev.h`.
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// A message of the `netdev` generic netlink family.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetdevMessage {
    command: u8,
    attributes: Vec<NetdevAttribute>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NetdevAttribute {
    IfIndex(u32),
    XdpFeatures(u64),
    Other(DefaultNla),
}

impl GenlFamily for NetdevMessage {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.command
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevMessage {
    fn buffer_len(&self) -> usize {
        self.attributes.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attributes.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMessage {
    fn parse_with_param(buffer: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attributes = NlasIterator::new(buffer)
            .map(|nla| nla.and_then(|nla| NetdevAttribute::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { command: header.cmd, attributes })
    }
}

impl Nla for NetdevAttribute {
    fn value_len(&self) -> usize {
        match self {
            Self::IfIndex(_) => 4,
            Self::XdpFeatures(_) => 8,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::IfIndex(_) => NETDEV_A_DEV_IFINDEX,
            Self::XdpFeatures(_) => NETDEV_A_DEV_XDP_FEATURES,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::IfIndex(index) => {
                let _ = emit_u32(buffer, *index);
            }
            Self::XdpFeatures(features) => buffer[..8].copy_from_slice(&features.to_ne_bytes()),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for NetdevAttribute {
    fn parse(buffer: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buffer.value();
        Ok(match buffer.kind() {
            NETDEV_A_DEV_IFINDEX => Self::IfIndex(parse_u32(value)?),
            NETDEV_A_DEV_XDP_FEATURES => Self::XdpFeatures(parse_u64(value)?),
            _ => Self::Other(DefaultNla::parse(buffer)?),
        })
    }
}
