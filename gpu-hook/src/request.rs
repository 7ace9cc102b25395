//! What a container asks for, from its environment, with the NVIDIA Container Toolkit's
//! semantics (users move images and pod specs between nodes running the toolkit and nodes
//! running HyperBox, so the same variables must mean the same thing).
//!
//! `NVIDIA_VISIBLE_DEVICES`:
//! - unset, empty, or holding `void` anywhere: not a GPU container, nothing is injected;
//!   except a legacy CUDA image (`CUDA_VERSION` set, `NVIDIA_REQUIRE_CUDA` not) with the
//!   variable unset, which gets `all`;
//! - otherwise a comma-separated list whose first `all` or `none` decides (`none`: the
//!   driver's files but no GPU), or else GPUs by index (`0`), UUID (`GPU-…`, any case), PCI
//!   bus id (`0000:3b:00.0`), MIG device (`0:1`, GPU 0's MIG device 1, or `MIG-…`). An entry
//!   that is none of these is an error naming it.
//!
//! `NVIDIA_DRIVER_CAPABILITIES`: unset or empty means `compute,utility`; otherwise a
//! comma-separated list of `compute`, `utility`, `video`, `graphics`, `display`, `compat32`,
//! `ngx`, or `all`. `video` brings `compute` with it (the codec libraries are CUDA clients)
//! and `display` brings `graphics`. An unknown capability is an error naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The annotation prefix under which the kubelet and users name CDI devices
/// (`cdi.k8s.io/KEY: nvidia.com/gpu=0,nvidia.com/gpu=1`).
pub const CDI_ANNOTATION_PREFIX: &str = "cdi.k8s.io/";
/// The CDI kind of NVIDIA GPUs.
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// The variable naming the GPUs.
pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// The variable naming the driver's capabilities.
pub const DRIVER_CAPABILITIES: &str = "NVIDIA_DRIVER_CAPABILITIES";
/// Set by CUDA images before `NVIDIA_REQUIRE_CUDA` existed.
pub const CUDA_VERSION: &str = "CUDA_VERSION";
/// The CUDA requirement of current CUDA images.
pub const REQUIRE_CUDA: &str = "NVIDIA_REQUIRE_CUDA";

/// Errors reading a container's GPU request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "{VISIBLE_DEVICES}: {0:?} is not a GPU: expected an index (0), a UUID (GPU-...), a PCI \
         bus id (0000:3b:00.0), a MIG device (0:1 or MIG-...), all, none or void"
    )]
    UnknownDevice(String),
    #[error(
        "{DRIVER_CAPABILITIES}: {0:?} is not a driver capability: expected compute, utility, \
         video, graphics, display, compat32, ngx or all"
    )]
    UnknownCapability(String),
    #[error(
        "annotation {key}: {name:?} is not an {CDI_KIND} device: expected an index (0), a UUID \
         (GPU-...), a MIG device (0:1 or MIG-...) or all"
    )]
    UnknownCdiDevice { key: String, name: String },
}

/// A container's environment as the OCI spec lists it (`KEY=VALUE`); a later entry for a
/// key replaces an earlier one, as in the process's own environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment(BTreeMap<String, String>);

impl Environment {
    /// From the spec's `process.env` entries; entries without `=` are ignored.
    pub fn from_entries<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut map = BTreeMap::new();
        for entry in entries {
            if let Some((k, v)) = entry.as_ref().split_once('=') {
                map.insert(k.to_owned(), v.to_owned());
            }
        }
        Environment(map)
    }

    /// The value of `key`, if set (possibly empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    pub fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.0
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// A legacy CUDA image: `CUDA_VERSION` set and `NVIDIA_REQUIRE_CUDA` unset or empty.
    pub fn is_legacy_cuda(&self) -> bool {
        self.get(CUDA_VERSION).is_some_and(|v| !v.is_empty())
            && self.get(REQUIRE_CUDA).is_none_or(str::is_empty)
    }
}

/// One GPU (or MIG device) named in `NVIDIA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceSelector {
    /// By NVML index.
    Index(u32),
    /// By UUID, kept as `GPU-` and the lowercase rest.
    Uuid(String),
    /// By PCI bus id, kept as NVML's extended form in lowercase: `0000abcd:3b:00.0`.
    PciBusId(String),
    /// GPU `gpu`'s MIG device `device` (`0:1`).
    Mig { gpu: u32, device: u32 },
    /// A MIG device by UUID, kept as `MIG-` and the lowercase rest.
    MigUuid(String),
}

impl DeviceSelector {
    /// Reads one entry of the list; `None` when it is none of the forms.
    fn parse(entry: &str) -> Option<Self> {
        let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if is_digits(entry) {
            return entry.parse().ok().map(DeviceSelector::Index);
        }
        if let Some((gpu, device)) = entry.split_once(':') {
            if is_digits(gpu) && is_digits(device) {
                return Some(DeviceSelector::Mig {
                    gpu: gpu.parse().ok()?,
                    device: device.parse().ok()?,
                });
            }
        }
        if let Some(uuid) = prefixed(entry, "GPU-").filter(|rest| uuid_like(rest)) {
            return Some(DeviceSelector::Uuid(format!("GPU-{uuid}")));
        }
        if let Some(rest) = prefixed(entry, "MIG-") {
            // Current drivers: MIG-<uuid>; R450/R460: MIG-GPU-<uuid>/<gi>/<ci>.
            if uuid_like(&rest) {
                return Some(DeviceSelector::MigUuid(format!("MIG-{rest}")));
            }
            let legacy = prefixed(&rest, "GPU-").and_then(|r| {
                let mut parts = r.split('/');
                let (uuid, gi, ci) = (parts.next()?, parts.next()?, parts.next()?);
                (parts.next().is_none() && uuid_like(uuid) && is_digits(gi) && is_digits(ci))
                    .then(|| format!("MIG-GPU-{uuid}/{gi}/{ci}"))
            });
            if let Some(uuid) = legacy {
                return Some(DeviceSelector::MigUuid(uuid));
            }
            return None;
        }
        pci_bus_id(entry).map(DeviceSelector::PciBusId)
    }
}

impl fmt::Display for DeviceSelector {
    /// The entry as `NVIDIA_VISIBLE_DEVICES` takes it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelector::Index(i) => write!(f, "{i}"),
            DeviceSelector::Mig { gpu, device } => write!(f, "{gpu}:{device}"),
            DeviceSelector::Uuid(s) | DeviceSelector::PciBusId(s) | DeviceSelector::MigUuid(s) => {
                f.write_str(s)
            }
        }
    }
}

/// The rest of `entry` after `prefix` (matched in any case), lowercased.
fn prefixed(entry: &str, prefix: &str) -> Option<String> {
    let head = entry.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| entry[prefix.len()..].to_ascii_lowercase())
}

/// Hex digits and dashes, not empty: the body of an NVML UUID.
fn uuid_like(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// `[DOMAIN:]BUS:DEVICE.FUNCTION` in hex (domain up to 8 digits, bus and device 2, function
/// 1), as NVML's extended form: 8-digit domain, lowercase.
fn pci_bus_id(entry: &str) -> Option<String> {
    let hex = |s: &str, max: usize| {
        (!s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    let (head, function) = entry.rsplit_once('.')?;
    let parts: Vec<&str> = head.split(':').collect();
    let (domain, bus, device) = match parts.as_slice() {
        [bus, device] => (0, *bus, *device),
        [domain, bus, device] => (hex(domain, 8)?, *bus, *device),
        _ => return None,
    };
    let (bus, device, function) = (hex(bus, 2)?, hex(device, 2)?, hex(function, 1)?);
    (device < 32 && function < 8)
        .then(|| format!("{domain:08x}:{bus:02x}:{device:02x}.{function:x}"))
}

/// The GPUs a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// Not a GPU container: nothing is injected.
    Void,
    /// The driver's files, no GPU.
    None,
    /// Every GPU of the node.
    All,
    /// These GPUs and MIG devices, in the order given, without repeats.
    Listed(Vec<DeviceSelector>),
}

impl Devices {
    /// The value of `NVIDIA_VISIBLE_DEVICES` that asks for exactly these devices.
    pub fn env_value(&self) -> String {
        match self {
            Devices::Void => "void".into(),
            Devices::None => "none".into(),
            Devices::All => "all".into(),
            Devices::Listed(l) => l
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// The `nvidia.com/gpu` devices that `cdi.k8s.io/*` annotations name (CDI's qualified
    /// names, `nvidia.com/gpu=0`, comma-separated), in annotation-key order; `None` when
    /// they name none (other kinds are left to whoever serves them).
    pub fn from_cdi_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Self>, RequestError> {
        let mut listed: Vec<DeviceSelector> = Vec::new();
        let mut any = false;
        for (key, value) in annotations.range(CDI_ANNOTATION_PREFIX.to_string()..) {
            if !key.starts_with(CDI_ANNOTATION_PREFIX) {
                break;
            }
            for qualified in value.split(',').map(str::trim) {
                let Some((kind, name)) = qualified.split_once('=') else {
                    continue;
                };
                if kind != CDI_KIND {
                    continue;
                }
                any = true;
                if name == "all" {
                    return Ok(Some(Devices::All));
                }
                let selector = DeviceSelector::parse(name)
                    .filter(|s| !matches!(s, DeviceSelector::PciBusId(_)))
                    .ok_or_else(|| RequestError::UnknownCdiDevice {
                        key: key.clone(),
                        name: name.to_owned(),
                    })?;
                if !listed.contains(&selector) {
                    listed.push(selector);
                }
            }
        }
        Ok(any.then_some(Devices::Listed(listed)))
    }

    /// `NVIDIA_VISIBLE_DEVICES` of `env` (see the module's documentation).
    pub fn from_env(env: &Environment) -> Result<Self, RequestError> {
        let value = env.get(VISIBLE_DEVICES);
        let entries: Vec<&str> = value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if value.is_none() && env.is_legacy_cuda() {
            return Ok(Devices::All);
        }
        if entries.is_empty() || entries.contains(&"void") {
            return Ok(Devices::Void);
        }
        for entry in &entries {
            match *entry {
                "all" => return Ok(Devices::All),
                "none" => return Ok(Devices::None),
                _ => {}
            }
        }
        let mut listed: Vec<DeviceSelector> = Vec::new();
        for entry in entries {
            let selector = DeviceSelector::parse(entry)
                .ok_or_else(|| RequestError::UnknownDevice(entry.to_owned()))?;
            if !listed.contains(&selector) {
                listed.push(selector);
            }
        }
        Ok(Devices::Listed(listed))
    }
}

/// A part of the driver a container may get.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Compute,
    Utility,
    Video,
    Graphics,
    Display,
    Compat32,
    Ngx,
}

impl Capability {
    /// Every capability, as `all` gives them.
    pub const ALL: [Capability; 7] = [
        Capability::Compute,
        Capability::Utility,
        Capability::Video,
        Capability::Graphics,
        Capability::Display,
        Capability::Compat32,
        Capability::Ngx,
    ];

    /// The name NVIDIA's variable uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Compute => "compute",
            Capability::Utility => "utility",
            Capability::Video => "video",
            Capability::Graphics => "graphics",
            Capability::Display => "display",
            Capability::Compat32 => "compat32",
            Capability::Ngx => "ngx",
        }
    }

    /// What a capability brings with it.
    fn implies(self) -> Option<Capability> {
        match self {
            Capability::Video => Some(Capability::Compute),
            Capability::Display => Some(Capability::Graphics),
            _ => None,
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The capabilities of `NVIDIA_DRIVER_CAPABILITIES` in `env` (see the module's
/// documentation), with what each implies.
pub fn capabilities_from_env(env: &Environment) -> Result<BTreeSet<Capability>, RequestError> {
    let entries: Vec<&str> = env
        .get(DRIVER_CAPABILITIES)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let mut set = BTreeSet::new();
    if entries.is_empty() {
        set.extend([Capability::Compute, Capability::Utility]);
        return Ok(set);
    }
    for entry in entries {
        if entry == "all" {
            set.extend(Capability::ALL);
            continue;
        }
        let cap = Capability::ALL
            .into_iter()
            .find(|c| c.as_str() == entry)
            .ok_or_else(|| RequestError::UnknownCapability(entry.to_owned()))?;
        set.insert(cap);
        set.extend(cap.implies());
    }
    Ok(set)
}

/// What a container asks for: GPUs and driver capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuRequest {
    pub devices: Devices,
    pub capabilities: BTreeSet<Capability>,
}

impl GpuRequest {
    /// What a container's spec asks for: `cdi.k8s.io/*` annotations naming `nvidia.com/gpu`
    /// devices first, then `NVIDIA_VISIBLE_DEVICES` when `env_allowed` (a node may refuse the
    /// variable from unprivileged containers). A container whose variable says `void` is not
    /// a GPU container whatever its annotations: this is what a CDI spec's edits set once a
    /// runtime has applied them, so nothing is injected twice.
    pub fn from_spec(
        env: &Environment,
        annotations: &BTreeMap<String, String>,
        env_allowed: bool,
    ) -> Result<Option<Self>, RequestError> {
        let void = env
            .get(VISIBLE_DEVICES)
            .is_some_and(|v| v.split(',').any(|e| e.trim() == "void"));
        if void {
            return Ok(None);
        }
        if let Some(devices) = Devices::from_cdi_annotations(annotations)? {
            return Ok(Some(GpuRequest {
                devices,
                capabilities: capabilities_from_env(env)?,
            }));
        }
        if env_allowed {
            Self::from_env(env)
        } else {
            Ok(None)
        }
    }

    /// Reads both variables; `Ok(None)` for a container that is not a GPU container
    /// (`void`), whose capabilities are then not read either (as the toolkit does).
    pub fn from_env(env: &Environment) -> Result<Option<Self>, RequestError> {
        let devices = Devices::from_env(env)?;
        if devices == Devices::Void {
            return Ok(None);
        }
        Ok(Some(GpuRequest {
            devices,
            capabilities: capabilities_from_env(env)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(entries: &[&str]) -> Environment {
        Environment::from_entries(entries)
    }

    fn annotations(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cdi_annotations_come_first() {
        let a = annotations(&[
            ("cdi.k8s.io/gpu", "nvidia.com/gpu=1,nvidia.com/gpu=MIG-AbC"),
            ("cdi.k8s.io/nic", "vendor.com/nic=eth1"),
            ("io.other", "nvidia.com/gpu=all"),
        ]);
        let env = env(&["NVIDIA_VISIBLE_DEVICES=0"]);
        let r = GpuRequest::from_spec(&env, &a, true).unwrap().unwrap();
        assert_eq!(
            r.devices,
            Devices::Listed(vec![
                DeviceSelector::Index(1),
                DeviceSelector::MigUuid("MIG-abc".into())
            ])
        );
        assert_eq!(r.devices.env_value(), "1,MIG-abc");
        let all = annotations(&[("cdi.k8s.io/x", "nvidia.com/gpu=all")]);
        assert_eq!(
            GpuRequest::from_spec(&env, &all, false)
                .unwrap()
                .unwrap()
                .devices,
            Devices::All
        );
        // Only other kinds: the variable decides, if the node accepts it.
        let nic = annotations(&[("cdi.k8s.io/nic", "vendor.com/nic=eth1")]);
        assert_eq!(
            GpuRequest::from_spec(&env, &nic, true)
                .unwrap()
                .unwrap()
                .devices
                .env_value(),
            "0"
        );
        assert_eq!(GpuRequest::from_spec(&env, &nic, false).unwrap(), None);
        // void (a CDI spec's edit, already applied): nothing.
        let applied = Environment::from_entries(["NVIDIA_VISIBLE_DEVICES=void"]);
        assert_eq!(GpuRequest::from_spec(&applied, &a, true).unwrap(), None);
        let bad = annotations(&[("cdi.k8s.io/gpu", "nvidia.com/gpu=../x")]);
        assert!(matches!(
            GpuRequest::from_spec(&env, &bad, true),
            Err(RequestError::UnknownCdiDevice { .. })
        ));
    }

    #[test]
    fn env_values_round_trip() {
        for value in [
            "all",
            "none",
            "void",
            "0,GPU-ab-cd,0000abcd:3b:00.0,1:2,MIG-ef",
        ] {
            let d = Devices::from_env(&env(&[&format!("NVIDIA_VISIBLE_DEVICES={value}")])).unwrap();
            assert_eq!(d.env_value(), value);
        }
    }

    fn devices(entries: &[&str]) -> Result<Devices, RequestError> {
        Devices::from_env(&env(entries))
    }

    #[test]
    fn unset_empty_and_void_are_not_gpu_containers() {
        for case in [
            &[][..],
            &["NVIDIA_VISIBLE_DEVICES="],
            &["NVIDIA_VISIBLE_DEVICES= , ,"],
            &["NVIDIA_VISIBLE_DEVICES=void"],
            &["NVIDIA_VISIBLE_DEVICES=0,void"],
            &["NVIDIA_VISIBLE_DEVICES=all,void"],
            // A legacy image with the variable set but empty is not given GPUs.
            &["CUDA_VERSION=9.0", "NVIDIA_VISIBLE_DEVICES="],
            // CUDA_VERSION with NVIDIA_REQUIRE_CUDA is a current image: no default.
            &["CUDA_VERSION=12.4", "NVIDIA_REQUIRE_CUDA=cuda>=12.4"],
        ] {
            assert_eq!(devices(case), Ok(Devices::Void), "{case:?}");
            assert_eq!(GpuRequest::from_env(&env(case)), Ok(None), "{case:?}");
        }
    }

    #[test]
    fn a_legacy_cuda_image_without_the_variable_gets_all() {
        assert_eq!(devices(&["CUDA_VERSION=9.0"]), Ok(Devices::All));
        assert_eq!(
            devices(&["CUDA_VERSION=9.0", "NVIDIA_REQUIRE_CUDA="]),
            Ok(Devices::All)
        );
        assert_eq!(devices(&["CUDA_VERSION="]), Ok(Devices::Void));
    }

    #[test]
    fn the_first_all_or_none_decides() {
        assert_eq!(devices(&["NVIDIA_VISIBLE_DEVICES=all"]), Ok(Devices::All));
        assert_eq!(devices(&["NVIDIA_VISIBLE_DEVICES=none"]), Ok(Devices::None));
        assert_eq!(
            devices(&["NVIDIA_VISIBLE_DEVICES=0, none ,all"]),
            Ok(Devices::None)
        );
        assert_eq!(
            devices(&["NVIDIA_VISIBLE_DEVICES=1,all,none"]),
            Ok(Devices::All)
        );
    }

    #[test]
    fn every_form_of_device_is_read_and_normalised() {
        let got = devices(&[
            "NVIDIA_VISIBLE_DEVICES=0, 3,GPU-AbC12345-6789-abcd-ef01-23456789ABCD,\
             0000:3B:00.0,3b:00.1,0:1,MIG-1a2b3c4d-0000-1111-2222-333344445555,0,gpu-abc12345-6789-abcd-ef01-23456789abcd",
        ])
        .unwrap();
        assert_eq!(
            got,
            Devices::Listed(vec![
                DeviceSelector::Index(0),
                DeviceSelector::Index(3),
                DeviceSelector::Uuid("GPU-abc12345-6789-abcd-ef01-23456789abcd".into()),
                DeviceSelector::PciBusId("00000000:3b:00.0".into()),
                DeviceSelector::PciBusId("00000000:3b:00.1".into()),
                DeviceSelector::Mig { gpu: 0, device: 1 },
                DeviceSelector::MigUuid("MIG-1a2b3c4d-0000-1111-2222-333344445555".into()),
            ])
        );
        assert_eq!(
            devices(&["NVIDIA_VISIBLE_DEVICES=MIG-GPU-ABCDEF01-2345/1/0"]),
            Ok(Devices::Listed(vec![DeviceSelector::MigUuid(
                "MIG-GPU-abcdef01-2345/1/0".into()
            )]))
        );
    }

    #[test]
    fn an_unknown_device_is_named() {
        for bad in [
            "gpu0",
            "-1",
            "0:",
            ":1",
            "0:1:2",
            "GPU-",
            "GPU-../../etc",
            "GPU-ab/cd",
            "MIG-zz",
            "MIG-GPU-ab/1",
            "MIG-GPU-ab/1/x",
            "MIG-GPU-ab/1/0/2",
            "3b:00",
            "3b:20.0",
            "3b:00.8",
            "123456789:3b:00.0",
            "99999999999",
            "all0",
        ] {
            let err = devices(&[&format!("NVIDIA_VISIBLE_DEVICES=0,{bad}")]).unwrap_err();
            assert_eq!(err, RequestError::UnknownDevice(bad.to_owned()), "{bad:?}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn capabilities_default_to_compute_and_utility() {
        use Capability::*;
        for case in [
            &["NVIDIA_VISIBLE_DEVICES=0"][..],
            &["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES="],
            &["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES= ,"],
        ] {
            let request = GpuRequest::from_env(&env(case)).unwrap().unwrap();
            assert_eq!(
                request.capabilities,
                BTreeSet::from([Compute, Utility]),
                "{case:?}"
            );
        }
    }

    #[test]
    fn capabilities_listed_all_and_implied() {
        use Capability::*;
        let caps =
            |v: &str| capabilities_from_env(&env(&[&format!("NVIDIA_DRIVER_CAPABILITIES={v}")]));
        assert_eq!(caps("utility"), Ok(BTreeSet::from([Utility])));
        assert_eq!(caps("video"), Ok(BTreeSet::from([Video, Compute])));
        assert_eq!(caps("display"), Ok(BTreeSet::from([Display, Graphics])));
        assert_eq!(
            caps("compute, compat32,ngx"),
            Ok(BTreeSet::from([Compute, Compat32, Ngx]))
        );
        assert_eq!(caps("all"), Ok(BTreeSet::from(Capability::ALL)));
        assert_eq!(caps("utility,all"), Ok(BTreeSet::from(Capability::ALL)));
        let err = caps("compute,Compute").unwrap_err();
        assert_eq!(err, RequestError::UnknownCapability("Compute".into()));
        assert!(err.to_string().contains("\"Compute\""), "{err}");
        assert_eq!(
            caps("compute,gaming"),
            Err(RequestError::UnknownCapability("gaming".into()))
        );
    }

    #[test]
    fn a_void_container_is_not_asked_for_capabilities() {
        // As the toolkit: a bad capability list does not fail a container without GPUs.
        let e = env(&[
            "NVIDIA_VISIBLE_DEVICES=void",
            "NVIDIA_DRIVER_CAPABILITIES=gaming",
        ]);
        assert_eq!(GpuRequest::from_env(&e), Ok(None));
        let e = env(&[
            "NVIDIA_VISIBLE_DEVICES=none",
            "NVIDIA_DRIVER_CAPABILITIES=gaming",
        ]);
        assert!(GpuRequest::from_env(&e).is_err());
    }

    #[test]
    fn the_last_definition_of_a_variable_counts() {
        let e = env(&[
            "NVIDIA_VISIBLE_DEVICES=all",
            "PATH=/bin",
            "NOEQUALS",
            "NVIDIA_VISIBLE_DEVICES=1",
        ]);
        assert_eq!(
            Devices::from_env(&e),
            Ok(Devices::Listed(vec![DeviceSelector::Index(1)]))
        );
        assert_eq!(e.get("NOEQUALS"), None);
        assert_eq!(
            e.with_prefix("NVIDIA_").collect::<Vec<_>>(),
            vec![("NVIDIA_VISIBLE_DEVICES", "1")]
        );
    }
}
