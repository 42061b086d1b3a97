//! Wire layouts of the headers hairpin reads and rewrites.

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_HEADER_LEN: usize = 14;
pub const IPV4_HEADER_LEN: usize = 20;
pub const L4_OFFSET: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHeader {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// big-endian
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    /// big-endian
    pub tot_len: u16,
    pub id: u16,
    /// big-endian, with the flags in the top three bits
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src_addr: u32,
    pub dst_addr: u32,
}

#[repr(C)]
pub struct TcpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack_seq: u32,
    pub data_offset: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

#[repr(C)]
pub struct UdpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    pub len: u16,
    pub check: u16,
}

const _: () = assert!(core::mem::size_of::<EthHeader>() == ETH_HEADER_LEN);
const _: () = assert!(core::mem::size_of::<Ipv4Header>() == IPV4_HEADER_LEN);
const _: () = assert!(core::mem::size_of::<TcpHeader>() == 20);
const _: () = assert!(core::mem::size_of::<UdpHeader>() == 8);

#[repr(C)]
pub struct IcmpHeader {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

const _: () = assert!(core::mem::size_of::<IcmpHeader>() == crate::icmp::ICMP_HEADER_LEN);
