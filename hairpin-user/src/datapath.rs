//! Loading the eBPF object, filling its maps from a [`Config`], attaching
//! it, and keeping it in bpffs (pinned) so that it outlives the daemon.

use std::{
    fs,
    os::fd::OwnedFd,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::{XdpLink, XdpMode as XdpAttachFlags},
    },
};
use hairpin_common::{ROLE_LAN, ROLE_WAN, Settings, maps::names, maps::programs};
use log::{info, warn};
use thiserror::Error;

pub use crate::maps::{Table, host_addr, wire_addr};
use crate::{
    attach::{self, AttachError, ChosenBy, Decision, Hook},
    config::Config,
    maps::{Maps, MapsError},
    netlink::{self, NetlinkError, XdpAttachMode},
};

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "this hairpin was built without its eBPF program (the eBPF toolchain was missing); run `cargo xtask setup` and rebuild"
    )]
    NoEbpfObject,
    #[error("interface `{0}` does not exist")]
    UnknownInterface(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("attaching native XDP to `{interface}`: {source}")]
    AttachXdp { interface: String, source: aya::programs::ProgramError },
    #[error("attaching the TC ingress program {program} to `{interface}`: {source}")]
    AttachTc { interface: String, program: &'static str, source: aya::programs::ProgramError },
    #[error("asking the kernel about `{interface}`: {source}")]
    LinkFacts { interface: String, source: NetlinkError },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("pinning under {path}: {message}")]
    Pin { path: String, message: String },
    #[error("refusing the pin path {path}: it {reason}")]
    UntrustedPin { path: String, reason: &'static str },
    #[error(
        "the pinned conntrack tables at {dir} hold {pinned} entries, the configuration asks for {configured}: \
         stop the running instance (which empties them) to change conntrack.capacity"
    )]
    Capacity { dir: String, pinned: u32, configured: u32 },
}

/// A socket to ask the kernel about interfaces with, in the calling
/// thread's network namespace.
fn interface_socket() -> std::io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socket_with};
    Ok(socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?)
}

/// The interface index of `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> Result<u32, DatapathError> {
    let unknown = || DatapathError::UnknownInterface(name.into());
    let socket = interface_socket().map_err(|_| unknown())?;
    rustix::net::netdevice::name_to_index(&socket, name).map_err(|_| unknown())
}

/// The name of interface `index`, if it exists.
pub fn if_name(index: u32) -> Option<String> {
    let socket = interface_socket().ok()?;
    rustix::net::netdevice::index_to_name(&socket, index).ok()
}

/// An interface the datapath is attached to, and how.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub if_index: u32,
    pub role: String,
    /// The hook the datapath runs in: `xdp` (native) or `tc`.
    pub mode: Hook,
    /// The program that sees the interface's packets first.
    pub program: String,
    pub chosen_by: ChosenBy,
    /// Why `auto` chose the mode; empty when configured.
    pub reason: String,
    /// Whether the links a former run left pinned were taken over.
    pub taken_over: bool,
}

impl Attachment {
    /// `TC (auto: veth peer cannot take XDP frames)`, `XDP native (configured)`.
    pub fn describe(&self) -> String {
        attach::describe(self.mode, self.chosen_by, &self.reason)
    }
}

/// Where an interface's datapath is to run, decided before attaching.
#[derive(Clone, Debug)]
pub struct PlannedAttachment {
    pub interface: String,
    pub if_index: u32,
    pub role: u8,
    pub decision: Decision,
}

/// Where a running instance keeps its maps and links in bpffs.
#[derive(Clone, Debug)]
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }

    fn links(&self) -> PathBuf {
        self.0.join("links")
    }

    /// Where the daemon pins its counting program ([`crate::entry_count`]).
    pub fn counter(&self) -> PathBuf {
        self.0.join(crate::entry_count::PIN)
    }

    fn link(&self, kind: &str, interface: &str) -> PathBuf {
        self.links().join(format!("{kind}_{interface}"))
    }

    /// Whether an instance left its maps here.
    pub fn exists(&self) -> bool {
        self.maps().join(names::LAYOUT).exists()
    }

    /// Refuses pins another user could have planted: the directory, its
    /// `maps` and `links` and every path in them must be no symlink and
    /// owned by root or this user. Paths that do not exist pass.
    pub fn check_ownership(&self) -> Result<(), DatapathError> {
        let euid = rustix::process::geteuid().as_raw();
        let mut paths = vec![self.0.clone(), self.maps(), self.links(), self.counter()];
        paths.extend(names::SHARED.iter().map(|name| self.maps().join(name)));
        if let Ok(links) = fs::read_dir(self.links()) {
            paths.extend(links.filter_map(Result::ok).map(|entry| entry.path()));
        }
        for path in paths {
            if let Ok(metadata) = fs::symlink_metadata(&path) {
                use std::os::unix::fs::MetadataExt as _;
                pin_path_trusted(metadata.file_type().is_symlink(), metadata.uid(), euid).map_err(
                    |reason| DatapathError::UntrustedPin {
                        path: path.display().to_string(),
                        reason,
                    },
                )?;
            }
        }
        Ok(())
    }
}

/// Why a pin path with these properties is not to be used, if it is not.
pub fn pin_path_trusted(is_symlink: bool, owner: u32, euid: u32) -> Result<(), &'static str> {
    if is_symlink {
        return Err("is a symbolic link, which hairpin does not follow (remove it)");
    }
    if owner != 0 && owner != euid {
        return Err("is owned by another user than root (remove it)");
    }
    Ok(())
}

/// The loaded datapath. Without pins, dropping it detaches everything;
/// with pins, everything stays until [`Datapath::remove`].
pub struct Datapath {
    ebpf: Ebpf,
    pub maps: Maps,
    pins: Option<PinDir>,
    links: Vec<PinnedLink>,
    /// Where `links` are pinned.
    pinned: Vec<PathBuf>,
    plan: Vec<PlannedAttachment>,
    attachments: Vec<Attachment>,
}

impl Datapath {
    /// Loads the programs and creates the maps, sized from `config`. With
    /// `pins`, maps are pinned there, and a running (or crashed) instance's
    /// pinned maps are used again, state and all.
    pub fn load(config: &Config, pins: Option<&PinDir>) -> Result<Self, DatapathError> {
        if crate::EBPF_OBJECT.is_empty() {
            return Err(DatapathError::NoEbpfObject);
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::CONNTRACK, config.conntrack_capacity)
            .map_max_entries(names::CONNTRACK_NEW, config.conntrack_capacity);
        let map_paths: Vec<(&str, PathBuf)>;
        if let Some(pins) = pins {
            prepare_pin_dir(pins)?;
            if pins.exists() {
                crate::maps::check_layout(&pins.maps())?;
                check_capacity(pins, config.conntrack_capacity)?;
            }
            map_paths = names::SHARED.iter().map(|name| (*name, pins.maps().join(name))).collect();
            for (name, path) in &map_paths {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        let xdp: &mut Xdp = program(&mut ebpf, programs::XDP)?;
        xdp.load().map_err(|source| DatapathError::Program { name: programs::XDP, source })?;
        for name in [programs::TC_INGRESS, programs::TC, programs::TC_L3] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?;
            tc.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        let mut maps = Maps::take(&mut ebpf)?;
        maps.stamp_layout()?;
        Ok(Self {
            ebpf,
            maps,
            pins: pins.cloned(),
            links: Vec::new(),
            pinned: Vec::new(),
            plan: Vec::new(),
            attachments: Vec::new(),
        })
    }

    /// Takes the aya-log ring buffer, for the caller to drain.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| warn!("eBPF log messages will not be shown: {e}"))
            .ok()
    }

    /// Makes settings, LAN networks, interfaces and mappings what `config`
    /// says. The interfaces must exist in the calling thread's namespace.
    /// Mappings already published as configured keep their statistics.
    pub fn configure(&mut self, config: &Config) -> Result<(), DatapathError> {
        let interfaces = managed_interfaces(config)
            .map(|(name, role)| Ok((if_index(name)?, role)))
            .collect::<Result<Vec<_>, DatapathError>>()?;
        self.maps.set_settings(settings(config))?;
        self.maps.set_lan_networks(&config.lan.networks)?;
        self.maps.set_interfaces(&interfaces)?;
        // XDP cannot redirect into an interface in TC mode: it hands such
        // packets to TC, as for any interface hairpin does not manage.
        let tc_mode = self.tc_mode_interfaces();
        let egress: Vec<u32> = interfaces
            .iter()
            .map(|(index, _)| *index)
            .filter(|index| !tc_mode.contains(index))
            .collect();
        self.maps.set_egress_devices(&egress)?;
        self.maps.set_config_deny(&config.deny)?;
        let (added, removed) = self.maps.replace_mappings(&config.mappings)?;
        for mapping in &removed {
            info!("mapping withdrawn: {mapping}");
        }
        if !removed.is_empty() || !added.is_empty() {
            info!("{} mapping(s) published, {} withdrawn", added.len(), removed.len());
        }
        Ok(())
    }

    /// Decides where each LAN and WAN interface's datapath runs (see
    /// [`crate::attach`]). Called by [`Datapath::attach`] when not before;
    /// called before [`Datapath::configure`], it keeps the TC-mode
    /// interfaces out of `EGRESS_DEVICES` from the start.
    pub fn plan(&mut self, config: &Config) -> Result<&[PlannedAttachment], DatapathError> {
        let redirect_target = managed_interfaces(config).count() > 1;
        self.plan = managed_interfaces(config)
            .map(|(name, role)| {
                let if_index = if_index(name)?;
                let facts = netlink::link_facts(if_index, redirect_target).map_err(|source| {
                    DatapathError::LinkFacts { interface: name.clone(), source }
                })?;
                let decision = attach::decide(name, config.attach.mode_for(name), &facts)?;
                Ok(PlannedAttachment { interface: name.clone(), if_index, role, decision })
            })
            .collect::<Result<_, DatapathError>>()?;
        Ok(&self.plan)
    }

    /// Attaches every LAN and WAN interface as [`Datapath::plan`] decided:
    /// native XDP with the TC hand-off classifier next to it, or the TC
    /// datapath alone. An instance's pinned links are taken over, so traffic
    /// never stops; its links of another kind (the interface's mode changed)
    /// or of interfaces no longer configured are removed once the new ones
    /// are in place. On any failure, what this call attached is detached
    /// again.
    pub fn attach(&mut self, config: &Config) -> Result<Vec<Attachment>, DatapathError> {
        if self.plan.is_empty() {
            self.plan(config)?;
        }
        for planned in self.plan.clone() {
            if let Err(error) = self.attach_interface(planned) {
                self.detach();
                return Err(error);
            }
        }
        let egress: Vec<u32> =
            self.attachments.iter().filter(|a| a.mode == Hook::Xdp).map(|a| a.if_index).collect();
        if let Err(error) = self.maps.set_egress_devices(&egress) {
            self.detach();
            return Err(error.into());
        }
        self.remove_stale_links();
        Ok(self.attachments.clone())
    }

    fn attach_interface(&mut self, planned: PlannedAttachment) -> Result<(), DatapathError> {
        let PlannedAttachment { interface: name, if_index: index, role, mut decision } = planned;
        if let Some(warning) = &decision.warning {
            warn!("{warning}");
        }
        let mut taken_over = false;
        if decision.hook == Hook::Xdp {
            match self.attach_xdp(&name, index) {
                Ok(reused) => {
                    taken_over = reused;
                    if decision.tc_if_native_xdp_fails {
                        decision.native_xdp_worked();
                    }
                }
                Err(DatapathError::AttachXdp { source, .. }) if decision.tc_if_native_xdp_fails => {
                    decision.fall_back_to_tc(&source.to_string());
                }
                Err(error) => return Err(error),
            }
        }
        let tc_program = decision.tc_program();
        taken_over |= self.attach_tc(&name, tc_program)?;
        let role = if role == ROLE_WAN { "wan" } else { "lan" };
        self.attachments.push(Attachment {
            interface: name,
            if_index: index,
            role: role.into(),
            mode: decision.hook,
            program: decision.program().into(),
            chosen_by: decision.chosen_by,
            reason: decision.reason,
            taken_over,
        });
        Ok(())
    }

    /// Native XDP on `name`, the pinned link taken over when there is one
    /// in native mode; whether it was.
    fn attach_xdp(&mut self, name: &str, index: u32) -> Result<bool, DatapathError> {
        let xdp_pin = self.pins.as_ref().map(|p| p.link("xdp", name));
        let mut pinned = xdp_pin.as_deref().and_then(|path| PinnedLink::from_pin(path).ok());
        if pinned.is_some()
            && netlink::link(index).is_ok_and(|l| l.xdp_attached == Some(XdpAttachMode::Skb))
        {
            warn!("{name}: replacing the generic (skb) XDP of a former run by native XDP");
            if let Some(link) = pinned.take() {
                drop(link.unpin());
            }
        }
        let xdp: &mut Xdp = program(&mut self.ebpf, programs::XDP)?;
        let reused = match pinned {
            Some(pinned) => {
                let link =
                    XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_error(&xdp_pin, e))?;
                match xdp.attach_to_link(link) {
                    Ok(id) => Some(id),
                    // The interface went away since (a link stays pinned but
                    // severed): attach afresh.
                    Err(e) => {
                        warn!(
                            "taking over the pinned XDP link of {name} failed ({e}); attaching anew"
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let taken_over = reused.is_some();
        let link_id = match reused {
            Some(id) => id,
            None => xdp
                .attach_to_if_index(index, XdpAttachFlags::Driver)
                .map_err(|source| DatapathError::AttachXdp { interface: name.into(), source })?,
        };
        if let Some(path) = &xdp_pin {
            let link = xdp
                .take_link(link_id)
                .map_err(|source| DatapathError::AttachXdp { interface: name.into(), source })?;
            let fd_link = FdLink::try_from(link).map_err(|e| pin_error(&xdp_pin, e))?;
            self.pin(fd_link, path)?;
        }
        Ok(taken_over)
    }

    /// `program_name` on `name`'s TC ingress (TCX where the kernel has it,
    /// else a clsact qdisc), the pinned link taken over (its program
    /// replaced) when there is one; whether it was.
    fn attach_tc(&mut self, name: &str, program_name: &'static str) -> Result<bool, DatapathError> {
        let tc_pin = self.pins.as_ref().map(|p| p.link("tc", name));
        let tc: &mut SchedClassifier = program(&mut self.ebpf, program_name)?;
        let attach_error = |source| DatapathError::AttachTc {
            interface: name.into(),
            program: program_name,
            source,
        };
        let taken_over = match tc_pin.as_deref().map(PinnedLink::from_pin) {
            Some(Ok(pinned)) => {
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| pin_error(&tc_pin, e))?;
                tc.attach_to_link(link)
                    .map_err(|e| {
                        warn!(
                            "taking over the pinned TC link of {name} failed ({e}); attaching anew"
                        )
                    })
                    .ok()
            }
            _ => None,
        };
        let reused = taken_over.is_some();
        let tc_id = match taken_over {
            Some(id) => id,
            None => match tc.attach(name, TcAttachType::Ingress) {
                Ok(id) => id,
                Err(source) => {
                    // Kernels before TCX (6.6) need a clsact qdisc first.
                    let _ = aya::programs::tc::qdisc_add_clsact(name);
                    tc.attach(name, TcAttachType::Ingress).map_err(|_| attach_error(source))?
                }
            },
        };
        if let Some(path) = &tc_pin {
            let link = tc.take_link(tc_id).map_err(attach_error)?;
            let fd_link = FdLink::try_from(link).map_err(|e| pin_error(&tc_pin, e))?;
            self.pin(fd_link, path)?;
        }
        Ok(reused)
    }

    fn pin(&mut self, link: FdLink, path: &Path) -> Result<(), DatapathError> {
        self.links.push(pin_link(link, path)?);
        self.pinned.push(path.to_path_buf());
        Ok(())
    }

    /// Removes the pinned links this instance did not attach: those of a
    /// kind an interface no longer has (an XDP link of an interface now in
    /// TC mode) and those of interfaces no longer configured. Their programs
    /// are detached with the last reference.
    fn remove_stale_links(&mut self) {
        let Some(pins) = &self.pins else { return };
        let Ok(entries) = fs::read_dir(pins.links()) else { return };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if self.pinned.contains(&path) {
                continue;
            }
            match PinnedLink::from_pin(&path) {
                Ok(link) => match link.unpin() {
                    Ok(_detached) => {
                        info!("detached the former link {}", entry.file_name().to_string_lossy())
                    }
                    Err(e) => warn!("removing the stale link {}: {e}", path.display()),
                },
                Err(e) => warn!("removing the stale link {}: {e}", path.display()),
            }
        }
    }

    /// Detaches from every interface. Pinned links are unpinned too.
    pub fn detach(&mut self) {
        for link in self.links.drain(..) {
            if let Err(e) = link.unpin() {
                warn!("unpinning a link: {e}");
            }
        }
        // Links still owned by the programs (no pins) go with the object.
        self.pinned.clear();
        self.attachments.clear();
    }

    /// Detaches and removes the pinned maps: the instance is gone.
    pub fn remove(mut self) {
        self.detach();
        if let Some(pins) = self.pins.take() {
            for name in names::SHARED {
                let _ = fs::remove_file(pins.maps().join(name));
            }
            let _ = fs::remove_file(pins.counter());
            let _ = fs::remove_dir(pins.links());
            let _ = fs::remove_dir(pins.maps());
            let _ = fs::remove_dir(&pins.0);
        }
    }

    /// Leaves everything attached and pinned, for a later `hairpin run` to
    /// take over: dropping pinned links and maps keeps their pins.
    pub fn keep(self) {}

    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, programs::XDP)
    }

    /// The TC datapath program (`programs::TC` or `programs::TC_L3`).
    pub fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program(&mut self.ebpf, name)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The interfaces attached (else planned) in TC mode.
    fn tc_mode_interfaces(&self) -> Vec<u32> {
        if !self.attachments.is_empty() {
            let tc = self.attachments.iter().filter(|a| a.mode == Hook::Tc);
            return tc.map(|a| a.if_index).collect();
        }
        let tc = self.plan.iter().filter(|p| p.decision.hook == Hook::Tc);
        tc.map(|p| p.if_index).collect()
    }
}

fn pin_error(path: &Option<PathBuf>, error: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        path: path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        message: error.to_string(),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<PinnedLink, DatapathError> {
    // Taken over links are pinned already, at the same path.
    let _ = fs::remove_file(path);
    link.pin(path).map_err(|e| pin_error(&Some(path.to_path_buf()), e))
}

/// Mounts bpffs where the pins go if it is not there (mode 0700), refuses
/// pin paths that are symlinks or someone else's, and creates the
/// directories, readable by root only.
fn prepare_pin_dir(pins: &PinDir) -> Result<(), DatapathError> {
    let bpffs = Path::new("/sys/fs/bpf");
    if pins.0.starts_with(bpffs) && !is_bpffs(bpffs) {
        rustix::mount::mount(
            "bpf",
            bpffs,
            "bpf",
            rustix::mount::MountFlags::NOSUID
                | rustix::mount::MountFlags::NODEV
                | rustix::mount::MountFlags::NOEXEC,
            BPFFS_MOUNT_OPTIONS,
        )
        .map_err(|e| DatapathError::Pin {
            path: bpffs.display().to_string(),
            message: format!("mounting bpffs: {e}"),
        })?;
    }
    pins.check_ownership()?;
    for dir in [pins.0.clone(), pins.maps(), pins.links()] {
        fs::create_dir_all(&dir)
            .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)))
            .map_err(|e| DatapathError::Pin {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
    }
    // Created just now: checked again, in case one appeared meanwhile.
    pins.check_ownership()
}

/// bpffs as hairpin mounts it: only root may look inside.
pub const BPFFS_MOUNT_OPTIONS: &std::ffi::CStr = c"mode=0700";

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    // `f_type`'s integer type differs between architectures.
    #[allow(clippy::useless_conversion)]
    rustix::fs::statfs(path).is_ok_and(|stat| i64::from(stat.f_type) == BPF_FS_MAGIC)
}

fn check_capacity(pins: &PinDir, configured: u32) -> Result<(), DatapathError> {
    let data = aya::maps::MapData::from_pin(pins.maps().join(names::CONNTRACK)).map_err(|e| {
        DatapathError::Pin { path: pins.0.display().to_string(), message: e.to_string() }
    })?;
    let pinned = data
        .info()
        .map_err(|e| DatapathError::Pin {
            path: pins.0.display().to_string(),
            message: e.to_string(),
        })?
        .max_entries();
    if pinned != configured {
        return Err(DatapathError::Capacity {
            dir: pins.0.display().to_string(),
            pinned,
            configured,
        });
    }
    Ok(())
}

/// The LAN interfaces, then the WAN one, with their roles.
fn managed_interfaces(config: &Config) -> impl Iterator<Item = (&String, u8)> {
    let lan = config.lan.interfaces.iter().map(|name| (name, ROLE_LAN));
    lan.chain(config.wan.iter().map(|wan| (&wan.interface, ROLE_WAN)))
}

const NANOS: u64 = 1_000_000_000;

/// The clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    now.tv_sec as u64 * NANOS + now.tv_nsec as u64
}

/// The settings the datapath is configured with.
pub fn settings(config: &Config) -> Settings {
    let (snat_port_first, snat_port_last) = config.lan.snat_ports;
    Settings {
        lan_addr: wire_addr(config.lan.address),
        snat_port_first,
        snat_port_last,
        tcp_established_ns: config.timeouts.tcp_established * NANOS,
        tcp_transitory_ns: config.timeouts.tcp_transitory * NANOS,
        udp_ns: config.timeouts.udp * NANOS,
        tcp_opening_ns: config.timeouts.tcp_opening * NANOS,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::root_owned(false, 0, 0, true)]
    #[case::own(false, 1000, 1000, true)]
    #[case::root_owned_for_a_user(false, 0, 1000, true)]
    #[case::symlink(true, 0, 0, false)]
    #[case::another_users(false, 1000, 0, false)]
    fn pin_paths_are_trusted_only_when_no_symlink_and_ours(
        #[case] symlink: bool,
        #[case] owner: u32,
        #[case] euid: u32,
        #[case] trusted: bool,
    ) {
        assert_eq!(pin_path_trusted(symlink, owner, euid).is_ok(), trusted);
    }

    #[test]
    fn a_symlinked_pin_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("hairpin-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("target")).expect("test setup: a directory");
        std::os::unix::fs::symlink(dir.join("target"), dir.join("pins"))
            .expect("test setup: a symlink");
        let own = PinDir(dir.join("target")).check_ownership();
        let linked = PinDir(dir.join("pins")).check_ownership();
        fs::create_dir_all(dir.join("target/maps")).expect("test setup: maps");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("target/maps").join(names::SETTINGS))
            .expect("test setup: a symlinked map");
        let linked_map = PinDir(dir.join("target")).check_ownership();
        let _ = fs::remove_dir_all(&dir);
        assert!(own.is_ok(), "our own directory: {own:?}");
        let error = linked.expect_err("a symlinked pin dir was accepted").to_string();
        assert!(error.contains("symbolic link") && !error.contains('\n'), "{error}");
        let error = linked_map.expect_err("a symlinked map pin was accepted").to_string();
        assert!(error.contains(names::SETTINGS) && error.contains("symbolic link"), "{error}");
    }

    #[test]
    #[ignore = "needs root"]
    fn hairpin_mounts_bpffs_for_root_only() {
        use rustix::{fs::statfs, mount, thread};
        // In a mount namespace of this thread's own, with /sys/fs/bpf
        // hidden under a tmpfs, so that hairpin has to mount bpffs there.
        let mode = std::thread::spawn(|| {
            // SAFETY: CLONE_FILES is not unshared: descriptors stay shared.
            unsafe {
                thread::unshare_unsafe(thread::UnshareFlags::NEWNS | thread::UnshareFlags::FS)
            }
            .expect("a mount namespace of its own (needs root)");
            mount::mount_change(
                "/",
                mount::MountPropagationFlags::REC | mount::MountPropagationFlags::PRIVATE,
            )
            .expect("private mounts, so nothing reaches the host");
            mount::mount("tmpfs", "/sys/fs/bpf", "tmpfs", mount::MountFlags::empty(), c"")
                .expect("hiding the host's bpffs");
            let pins = PinDir(PathBuf::from("/sys/fs/bpf/hairpin-mount-test"));
            prepare_pin_dir(&pins).expect("preparing the pin dir");
            let magic = statfs("/sys/fs/bpf").expect("statfs").f_type as i64;
            let mode = fs::metadata("/sys/fs/bpf").expect("stat").permissions().mode() & 0o7777;
            (magic, mode, is_bpffs(Path::new("/sys/fs/bpf")))
        })
        .join()
        .expect("the mount thread panicked");
        assert!(mode.2, "hairpin did not mount bpffs (f_type {:#x})", mode.0);
        // The kernel sets the sticky bit on every bpffs root; what matters is
        // that only its owner may enter it.
        assert_eq!(mode.1 & 0o777, 0o700, "bpffs mounted with mode {:o}", mode.1);
    }
}
