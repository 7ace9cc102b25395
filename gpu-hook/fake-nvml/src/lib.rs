//! A fake `libnvidia-ml.so.1` (NVML) for tests, so that code loading NVML at run time
//! (`hyperbox-gpu-cdi`, through the `nvml-wrapper` crate) runs its real `dlopen` path on a
//! machine without a GPU.
//!
//! The library exports, with NVML's C ABI, signatures and return codes, the functions the
//! generator calls: `nvmlInit_v2`, `nvmlInitWithFlags`, `nvmlShutdown`, `nvmlErrorString`,
//! `nvmlSystemGetDriverVersion`, `nvmlSystemGetCudaDriverVersion` (and `_v2`),
//! `nvmlDeviceGetCount_v2`, `nvmlDeviceGetHandleByIndex_v2`, `nvmlDeviceGetIndex`,
//! `nvmlDeviceGetUUID`, `nvmlDeviceGetName`, `nvmlDeviceGetBrand`, `nvmlDeviceGetMinorNumber`,
//! `nvmlDeviceGetPciInfo_v3`, `nvmlDeviceGetCudaComputeCapability`, `nvmlDeviceGetMigMode`,
//! `nvmlDeviceGetMaxMigDeviceCount`, `nvmlDeviceGetMigDeviceHandleByIndex`,
//! `nvmlDeviceIsMigDeviceHandle`, `nvmlDeviceGetDeviceHandleFromMigDeviceHandle`,
//! `nvmlDeviceGetGpuInstanceId` and `nvmlDeviceGetComputeInstanceId`. Its SONAME is
//! `libnvidia-ml.so.1` (`build.rs`), so `ldconfig` files it as the real one.
//!
//! # Where its description comes from
//!
//! The library finds the path it was loaded from (`dladdr` on itself: the path as given to
//! `dlopen`, say `ROOT/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1`) and reads
//! `hyperbox-fake-nvml.json` in that same directory at the first `nvmlInit*` of a session
//! (after every `nvmlShutdown` that balanced the inits, the next init reads it again). No
//! such file is a machine without the driver: `nvmlInit*` returns
//! `NVML_ERROR_DRIVER_NOT_LOADED` (9). A file that cannot be read, parsed or checked returns
//! `NVML_ERROR_UNKNOWN` (999) and says why on stderr.
//!
//! Every successful `nvmlInit*` appends one line `init pid=<pid> exe=<readlink
//! /proc/self/exe>` to `hyperbox-fake-nvml.log` in the same directory (created if missing),
//! so a test can prove which processes loaded NVML (and that none did at container start).
//! An init whose line cannot be written fails (`NVML_ERROR_UNKNOWN`): no silent load.
//!
//! # The JSON file
//!
//! ```json
//! { "driver_version": "550.54.15",
//!   "cuda_version": 12040,
//!   "gpus": [
//!     { "name": "NVIDIA A100-SXM4-40GB",
//!       "uuid": "GPU-8f6c1a2e-0d4b-4c61-9e5a-3b7f2c1d0e01",
//!       "minor": 0,
//!       "bus_id": "00000000:3B:00.0",
//!       "pci_device_id": 548409566,
//!       "pci_subsystem_id": 323948766,
//!       "brand": 2,
//!       "compute_capability": [8, 0],
//!       "mig": { "enabled": true, "max_devices": 7,
//!                "devices": [ { "uuid": "MIG-5c8d…", "gpu_instance_id": 1,
//!                               "compute_instance_id": 0 } ] } } ] }
//! ```
//!
//! Unknown fields are errors. Per field:
//!
//! - `driver_version`: `nvmlSystemGetDriverVersion`; `cuda_version`: `nvmlSystemGetCudaDriverVersion`
//!   (`1000 * major + 10 * minor`, 12040 is CUDA 12.4).
//! - `gpus`: NVML numbers GPUs in PCI bus order, so the fake does too, whatever the order in
//!   the file. `name`, `uuid` (`GPU-…`), `minor` (of `/dev/nvidia<minor>`), `brand` (NVML's
//!   `nvmlBrandType_t` number: 2 Tesla, 5 GeForce, 14 NVIDIA, …) and `compute_capability`
//!   (`[major, minor]`) are returned as given. `bus_id` is `DOMAIN:BUS:DEVICE.FUNCTION` in hex
//!   (4- or 8-digit domain, any case); `nvmlDeviceGetPciInfo_v3` returns it in NVML's forms
//!   (`00000000:3B:00.0`, legacy `0000:3B:00.0`) with the parsed numbers and
//!   `pci_device_id` (`device << 16 | vendor`, 0x20B010DE for an A100-SXM4-40GB) and
//!   `pci_subsystem_id` (optional, default 0).
//! - `mig` absent: the GPU is not MIG capable (`nvmlDeviceGetMigMode` and
//!   `nvmlDeviceGetMigDeviceHandleByIndex` return `NVML_ERROR_NOT_SUPPORTED`;
//!   `nvmlDeviceGetMaxMigDeviceCount` returns 0, as NVML documents: "zero if MIG is not
//!   supported or enabled"). Present: `enabled` is the current and pending MIG mode;
//!   `max_devices` is the maximum MIG device count when enabled; `devices` (only when enabled,
//!   at most `max_devices`) are the MIG devices at indices 0, 1, …: an index below
//!   `max_devices` without a device is `NVML_ERROR_NOT_FOUND`, one at or past it
//!   `NVML_ERROR_INVALID_ARGUMENT`. A MIG device's `uuid` starts with `MIG-`.
//!
//! # Handles and errors
//!
//! Handles point to data the library owns for its whole lifetime; a handle the library did
//! not hand out in the current session is `NVML_ERROR_INVALID_ARGUMENT`, as is a NULL
//! output pointer. Before init, and after the shutdown that balanced the last init, every
//! call but `nvmlErrorString` returns `NVML_ERROR_UNINITIALIZED`. A string buffer shorter than
//! the string and its NUL is `NVML_ERROR_INSUFFICIENT_SIZE`.
//!
//! A MIG device handle answers: its UUID, its name (the parent's name and ` MIG`), its
//! parent's minor number, brand, PCI information and compute capability, its GPU and compute
//! instance ids, `nvmlDeviceIsMigDeviceHandle` (1) and
//! `nvmlDeviceGetDeviceHandleFromMigDeviceHandle` (the parent). Asked for its index, MIG mode,
//! maximum MIG device count or MIG devices, it returns `NVML_ERROR_NOT_SUPPORTED`. A GPU handle
//! asked for instance ids returns `NVML_ERROR_NOT_SUPPORTED`, asked for its parent
//! `NVML_ERROR_INVALID_ARGUMENT`.

#![allow(non_snake_case, non_camel_case_types)]

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Deserialize;

/// The description's file name, next to the library.
pub const CONFIG_FILE: &str = "hyperbox-fake-nvml.json";
/// The init log's file name, next to the library.
pub const LOG_FILE: &str = "hyperbox-fake-nvml.log";

/// NVML's `nvmlReturn_t`.
pub type nvmlReturn_t = c_uint;
/// NVML's `nvmlBrandType_t`.
pub type nvmlBrandType_t = c_uint;

pub const NVML_SUCCESS: nvmlReturn_t = 0;
pub const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
pub const NVML_ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
pub const NVML_ERROR_NOT_FOUND: nvmlReturn_t = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
pub const NVML_ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
pub const NVML_ERROR_UNKNOWN: nvmlReturn_t = 999;

/// NVML's opaque device struct; a handle (`nvmlDevice_t`) points to it.
#[repr(C)]
#[derive(Debug)]
pub struct nvmlDevice_st {
    _opaque: [u8; 0],
}
/// NVML's device handle.
pub type nvmlDevice_t = *mut nvmlDevice_st;

/// NVML's `nvmlPciInfo_t` (the layout `nvmlDeviceGetPciInfo_v3` fills).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvmlPciInfo_t {
    pub busIdLegacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pciDeviceId: c_uint,
    pub pciSubSystemId: c_uint,
    pub busId: [c_char; 32],
}

// ---------------------------------------------------------------------------------------
// The description file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    driver_version: String,
    cuda_version: c_int,
    gpus: Vec<GpuConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuConfig {
    name: String,
    uuid: String,
    minor: c_uint,
    bus_id: String,
    pci_device_id: c_uint,
    #[serde(default)]
    pci_subsystem_id: c_uint,
    brand: nvmlBrandType_t,
    compute_capability: [c_int; 2],
    #[serde(default)]
    mig: Option<MigConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigConfig {
    enabled: bool,
    max_devices: c_uint,
    #[serde(default)]
    devices: Vec<MigDeviceConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigDeviceConfig {
    uuid: String,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

// ---------------------------------------------------------------------------------------
// What the library answers from: built once per session, then never changed or freed.

#[derive(Debug)]
struct Model {
    driver_version: CString,
    cuda_version: c_int,
    gpus: Vec<Gpu>,
}

#[derive(Debug)]
struct Gpu {
    name: CString,
    uuid: CString,
    minor: c_uint,
    brand: nvmlBrandType_t,
    compute_capability: (c_int, c_int),
    pci: nvmlPciInfo_t,
    mig: Option<Mig>,
}

#[derive(Debug)]
struct Mig {
    enabled: bool,
    max_devices: c_uint,
    devices: Vec<MigDevice>,
}

#[derive(Debug)]
struct MigDevice {
    uuid: CString,
    name: CString,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// What a handle stands for.
#[derive(Debug, Clone, Copy)]
enum Handle {
    Gpu {
        index: usize,
        gpu: &'static Gpu,
    },
    Mig {
        parent: &'static Gpu,
        mig: &'static MigDevice,
    },
}

impl Handle {
    /// The physical GPU: itself, or a MIG device's parent.
    fn gpu(self) -> &'static Gpu {
        match self {
            Handle::Gpu { gpu, .. } => gpu,
            Handle::Mig { parent, .. } => parent,
        }
    }
}

fn handle_of<T>(item: &'static T) -> nvmlDevice_t {
    (item as *const T).cast_mut().cast()
}

impl Model {
    fn resolve(&'static self, handle: nvmlDevice_t) -> Option<Handle> {
        for (index, gpu) in self.gpus.iter().enumerate() {
            if std::ptr::addr_eq(handle.cast_const(), gpu as *const Gpu) {
                return Some(Handle::Gpu { index, gpu });
            }
            let migs = gpu.mig.as_ref().map_or(&[][..], |m| &m.devices[..]);
            if let Some(mig) = migs
                .iter()
                .find(|m| std::ptr::addr_eq(handle.cast_const(), *m as *const MigDevice))
            {
                return Some(Handle::Mig { parent: gpu, mig });
            }
        }
        None
    }
}

/// Parses `DOMAIN:BUS:DEVICE.FUNCTION` (hex).
fn parse_bus_id(text: &str) -> Option<(u32, u32, u32, u32)> {
    let (domain, rest) = text.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str, max_len: usize| {
        (!s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
    };
    Some((
        hex(domain, 8)?,
        hex(bus, 2)?,
        hex(device, 2)?,
        hex(function, 1)?,
    ))
}

/// Copies `text` and its NUL into a fixed C array (the caller checked the length).
fn c_array<const N: usize>(text: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (o, b) in out.iter_mut().zip(text.bytes().take(N - 1)) {
        *o = b as c_char;
    }
    out
}

fn c_string(what: &str, text: &str) -> Result<CString, String> {
    CString::new(text).map_err(|_| format!("{what} {text:?} holds a NUL byte"))
}

impl Model {
    fn from_config(config: Config) -> Result<Self, String> {
        let mut uuids = BTreeSet::new();
        let mut minors = BTreeSet::new();
        let mut buses = BTreeSet::new();
        let mut gpus = Vec::new();
        for g in config.gpus {
            if !g.uuid.starts_with("GPU-") {
                return Err(format!("GPU uuid {:?} does not start with GPU-", g.uuid));
            }
            if !uuids.insert(g.uuid.clone()) {
                return Err(format!("uuid {:?} given twice", g.uuid));
            }
            if !minors.insert(g.minor) {
                return Err(format!("minor {} given twice", g.minor));
            }
            let (domain, bus, device, function) = parse_bus_id(&g.bus_id).ok_or_else(|| {
                format!(
                    "bus_id {:?} is not DOMAIN:BUS:DEVICE.FUNCTION in hex",
                    g.bus_id
                )
            })?;
            if !buses.insert((domain, bus, device, function)) {
                return Err(format!("bus_id {:?} given twice", g.bus_id));
            }
            let bus_id = format!("{domain:08X}:{bus:02X}:{device:02X}.{function:X}");
            let legacy = format!(
                "{:04X}:{bus:02X}:{device:02X}.{function:X}",
                domain & 0xffff
            );
            let pci = nvmlPciInfo_t {
                busIdLegacy: c_array(&legacy),
                domain,
                bus,
                device,
                pciDeviceId: g.pci_device_id,
                pciSubSystemId: g.pci_subsystem_id,
                busId: c_array(&bus_id),
            };
            let mig = match g.mig {
                None => None,
                Some(m) => {
                    if !m.enabled && !m.devices.is_empty() {
                        return Err(format!("GPU {}: MIG devices with MIG disabled", g.uuid));
                    }
                    if m.devices.len() > m.max_devices as usize {
                        return Err(format!(
                            "GPU {}: {} MIG devices, more than max_devices {}",
                            g.uuid,
                            m.devices.len(),
                            m.max_devices
                        ));
                    }
                    let mut instances = BTreeSet::new();
                    let mut devices = Vec::new();
                    for d in m.devices {
                        if !d.uuid.starts_with("MIG-") {
                            return Err(format!("MIG uuid {:?} does not start with MIG-", d.uuid));
                        }
                        if !uuids.insert(d.uuid.clone()) {
                            return Err(format!("uuid {:?} given twice", d.uuid));
                        }
                        if !instances.insert((d.gpu_instance_id, d.compute_instance_id)) {
                            return Err(format!(
                                "GPU {}: GPU instance {} compute instance {} given twice",
                                g.uuid, d.gpu_instance_id, d.compute_instance_id
                            ));
                        }
                        devices.push(MigDevice {
                            uuid: c_string("MIG uuid", &d.uuid)?,
                            name: c_string("name", &format!("{} MIG", g.name))?,
                            gpu_instance_id: d.gpu_instance_id,
                            compute_instance_id: d.compute_instance_id,
                        });
                    }
                    Some(Mig {
                        enabled: m.enabled,
                        max_devices: m.max_devices,
                        devices,
                    })
                }
            };
            gpus.push((
                (domain, bus, device, function),
                Gpu {
                    name: c_string("name", &g.name)?,
                    uuid: c_string("uuid", &g.uuid)?,
                    minor: g.minor,
                    brand: g.brand,
                    compute_capability: (g.compute_capability[0], g.compute_capability[1]),
                    pci,
                    mig,
                },
            ));
        }
        // NVML enumerates GPUs in PCI bus order.
        gpus.sort_by_key(|(bus, _)| *bus);
        Ok(Model {
            driver_version: c_string("driver_version", &config.driver_version)?,
            cuda_version: config.cuda_version,
            gpus: gpus.into_iter().map(|(_, g)| g).collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Session state.

#[derive(Debug)]
struct State {
    inits: u32,
    model: Option<&'static Model>,
}

static STATE: Mutex<State> = Mutex::new(State {
    inits: 0,
    model: None,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The model of the current session, or `NVML_ERROR_UNINITIALIZED`.
fn model() -> Result<&'static Model, nvmlReturn_t> {
    let state = state();
    match state.model {
        Some(model) if state.inits > 0 => Ok(model),
        _ => Err(NVML_ERROR_UNINITIALIZED),
    }
}

/// What `handle` stands for in the current session.
fn lookup(handle: nvmlDevice_t) -> Result<Handle, nvmlReturn_t> {
    model()?.resolve(handle).ok_or(NVML_ERROR_INVALID_ARGUMENT)
}

/// An address inside this library, for `dladdr`.
static ANCHOR: u8 = 0;

/// The path this library was loaded from, as the loader knows it.
fn own_path() -> Option<PathBuf> {
    // SAFETY: Dl_info is a plain C struct of pointers, for which all zeroes is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address (one inside this object) and fills `info`.
    let found = unsafe { libc::dladdr(std::ptr::addr_of!(ANCHOR).cast::<c_void>(), &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is the loader's NUL-terminated name of this object, valid while the
    // object stays loaded (it is, as this code runs in it).
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(OsStr::from_bytes(name.to_bytes())))
}

fn load(dir: &Path) -> Result<Model, nvmlReturn_t> {
    let path = dir.join(CONFIG_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(NVML_ERROR_DRIVER_NOT_LOADED),
        Err(e) => {
            eprintln!("hyperbox-fake-nvml: cannot read {}: {e}", path.display());
            return Err(NVML_ERROR_UNKNOWN);
        }
    };
    serde_json::from_str::<Config>(&text)
        .map_err(|e| e.to_string())
        .and_then(Model::from_config)
        .map_err(|e| {
            eprintln!("hyperbox-fake-nvml: {}: {e}", path.display());
            NVML_ERROR_UNKNOWN
        })
}

fn log_init(dir: &Path) -> io::Result<()> {
    let exe = fs::read_link("/proc/self/exe")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    let line = format!("init pid={} exe={exe}\n", std::process::id());
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(LOG_FILE))?
        .write_all(line.as_bytes())
}

fn init() -> nvmlReturn_t {
    let mut state = state();
    let Some(dir) = own_path().and_then(|p| p.parent().map(Path::to_path_buf)) else {
        eprintln!("hyperbox-fake-nvml: cannot tell where the library was loaded from");
        return NVML_ERROR_UNKNOWN;
    };
    if state.inits == 0 {
        // A new session reads the description again (a driver may have come or gone).
        match load(&dir) {
            Ok(model) => state.model = Some(Box::leak(Box::new(model))),
            Err(ret) => return ret,
        }
    }
    if let Err(e) = log_init(&dir) {
        eprintln!(
            "hyperbox-fake-nvml: cannot append to {}: {e}",
            dir.join(LOG_FILE).display()
        );
        return NVML_ERROR_UNKNOWN;
    }
    state.inits += 1;
    NVML_SUCCESS
}

// ---------------------------------------------------------------------------------------
// Output helpers.

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(ret) => return ret,
        }
    };
}

/// Writes `value` to `out`.
///
/// # Safety
///
/// `out` is NULL (refused) or valid for a write of a `T`.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: not NULL, and valid for a write by this function's contract.
    unsafe { out.write(value) };
    NVML_SUCCESS
}

/// Copies `text` and its NUL into `buf` of `length` bytes.
///
/// # Safety
///
/// `buf` is NULL (refused) or valid for writes of `length` bytes.
unsafe fn put_str(text: &CStr, buf: *mut c_char, length: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let bytes = text.to_bytes_with_nul();
    if (length as usize) < bytes.len() {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: `buf` holds at least `length >= bytes.len()` writable bytes (the contract), and
    // cannot overlap the library's own string.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len()) };
    NVML_SUCCESS
}

// ---------------------------------------------------------------------------------------
// The exported API.

/// `nvmlInit_v2`: starts (or nests) a session.
///
/// # Safety
///
/// None beyond NVML's: callable from any thread.
#[no_mangle]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// `nvmlInitWithFlags`: as `nvmlInit_v2`; the flags (`NVML_INIT_FLAG_NO_GPUS`,
/// `NVML_INIT_FLAG_NO_ATTACH`) change nothing for a fake.
///
/// # Safety
///
/// None beyond NVML's: callable from any thread.
#[no_mangle]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// `nvmlShutdown`: ends one init; the last one ends the session.
///
/// # Safety
///
/// None beyond NVML's: callable from any thread.
#[no_mangle]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut state = state();
    if state.inits == 0 {
        return NVML_ERROR_UNINITIALIZED;
    }
    state.inits -= 1;
    NVML_SUCCESS
}

/// `nvmlErrorString`: NVML's text for a return code (a static string).
///
/// # Safety
///
/// None: any value is accepted.
#[no_mangle]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt Request Issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
///
/// `version` is NULL or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let model = tri!(model());
    // SAFETY: the caller's contract is put_str's.
    unsafe { put_str(&model.driver_version, version, length) }
}

/// `nvmlSystemGetCudaDriverVersion`.
///
/// # Safety
///
/// `cuda_driver_version` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(
    cuda_driver_version: *mut c_int,
) -> nvmlReturn_t {
    let model = tri!(model());
    // SAFETY: the caller's contract is put's.
    unsafe { put(cuda_driver_version, model.cuda_version) }
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
///
/// # Safety
///
/// `cuda_driver_version` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(
    cuda_driver_version: *mut c_int,
) -> nvmlReturn_t {
    // SAFETY: the same contract.
    unsafe { nvmlSystemGetCudaDriverVersion(cuda_driver_version) }
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
///
/// `device_count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> nvmlReturn_t {
    let model = tri!(model());
    // SAFETY: the caller's contract is put's.
    unsafe { put(device_count, model.gpus.len() as c_uint) }
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
///
/// `device` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let model = tri!(model());
    let Some(gpu) = model.gpus.get(index as usize) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(device, handle_of(gpu)) }
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
///
/// `index` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    match tri!(lookup(device)) {
        // SAFETY: the caller's contract is put's.
        Handle::Gpu { index: i, .. } => unsafe { put(index, i as c_uint) },
        Handle::Mig { .. } => NVML_ERROR_NOT_SUPPORTED,
    }
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
///
/// `uuid` is NULL or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let text = match tri!(lookup(device)) {
        Handle::Gpu { gpu, .. } => &gpu.uuid,
        Handle::Mig { mig, .. } => &mig.uuid,
    };
    // SAFETY: the caller's contract is put_str's.
    unsafe { put_str(text, uuid, length) }
}

/// `nvmlDeviceGetName`.
///
/// # Safety
///
/// `name` is NULL or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let text = match tri!(lookup(device)) {
        Handle::Gpu { gpu, .. } => &gpu.name,
        Handle::Mig { mig, .. } => &mig.name,
    };
    // SAFETY: the caller's contract is put_str's.
    unsafe { put_str(text, name, length) }
}

/// `nvmlDeviceGetBrand`.
///
/// # Safety
///
/// `type_` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetBrand(
    device: nvmlDevice_t,
    type_: *mut nvmlBrandType_t,
) -> nvmlReturn_t {
    let gpu = tri!(lookup(device)).gpu();
    // SAFETY: the caller's contract is put's.
    unsafe { put(type_, gpu.brand) }
}

/// `nvmlDeviceGetMinorNumber`.
///
/// # Safety
///
/// `minor_number` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor_number: *mut c_uint,
) -> nvmlReturn_t {
    let gpu = tri!(lookup(device)).gpu();
    // SAFETY: the caller's contract is put's.
    unsafe { put(minor_number, gpu.minor) }
}

/// `nvmlDeviceGetPciInfo_v3`.
///
/// # Safety
///
/// `pci` is NULL or valid for a write of an `nvmlPciInfo_t`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    let gpu = tri!(lookup(device)).gpu();
    // SAFETY: the caller's contract is put's.
    unsafe { put(pci, gpu.pci) }
}

/// `nvmlDeviceGetCudaComputeCapability`.
///
/// # Safety
///
/// `major` and `minor` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> nvmlReturn_t {
    let gpu = tri!(lookup(device)).gpu();
    if major.is_null() || minor.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let (ma, mi) = gpu.compute_capability;
    // SAFETY: both checked not NULL; valid for writes by the caller's contract.
    unsafe {
        major.write(ma);
        minor.write(mi);
    }
    NVML_SUCCESS
}

/// `nvmlDeviceGetMigMode`: current and pending mode (`NVML_DEVICE_MIG_ENABLE` 1 or
/// `_DISABLE` 0); `NVML_ERROR_NOT_SUPPORTED` on a GPU that is not MIG capable.
///
/// # Safety
///
/// `current_mode` and `pending_mode` are NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current_mode: *mut c_uint,
    pending_mode: *mut c_uint,
) -> nvmlReturn_t {
    let Handle::Gpu { gpu, .. } = tri!(lookup(device)) else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    let Some(mig) = &gpu.mig else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    if current_mode.is_null() || pending_mode.is_null() {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: both checked not NULL; valid for writes by the caller's contract.
    unsafe {
        current_mode.write(c_uint::from(mig.enabled));
        pending_mode.write(c_uint::from(mig.enabled));
    }
    NVML_SUCCESS
}

/// `nvmlDeviceGetMaxMigDeviceCount`: zero when MIG is not supported or not enabled.
///
/// # Safety
///
/// `count` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let Handle::Gpu { gpu, .. } = tri!(lookup(device)) else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    let max = match &gpu.mig {
        Some(mig) if mig.enabled => mig.max_devices,
        _ => 0,
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(count, max) }
}

/// `nvmlDeviceGetMigDeviceHandleByIndex`.
///
/// # Safety
///
/// `mig_device` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Handle::Gpu { gpu, .. } = tri!(lookup(device)) else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    let Some(mig) = &gpu.mig else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    let max = if mig.enabled { mig.max_devices } else { 0 };
    if index >= max {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    let Some(found) = mig.devices.get(index as usize) else {
        return NVML_ERROR_NOT_FOUND;
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(mig_device, handle_of(found)) }
}

/// `nvmlDeviceIsMigDeviceHandle`: 1 for a MIG device, 0 for a GPU.
///
/// # Safety
///
/// `is_mig_device` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig_device: *mut c_uint,
) -> nvmlReturn_t {
    let is_mig = matches!(tri!(lookup(device)), Handle::Mig { .. });
    // SAFETY: the caller's contract is put's.
    unsafe { put(is_mig_device, c_uint::from(is_mig)) }
}

/// `nvmlDeviceGetDeviceHandleFromMigDeviceHandle`: a MIG device's parent GPU.
///
/// # Safety
///
/// `device` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Handle::Mig { parent, .. } = tri!(lookup(mig_device)) else {
        return NVML_ERROR_INVALID_ARGUMENT;
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(device, handle_of(parent)) }
}

/// `nvmlDeviceGetGpuInstanceId`: a MIG device's GPU instance.
///
/// # Safety
///
/// `id` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let Handle::Mig { mig, .. } = tri!(lookup(device)) else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(id, mig.gpu_instance_id) }
}

/// `nvmlDeviceGetComputeInstanceId`: a MIG device's compute instance.
///
/// # Safety
///
/// `id` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let Handle::Mig { mig, .. } = tri!(lookup(device)) else {
        return NVML_ERROR_NOT_SUPPORTED;
    };
    // SAFETY: the caller's contract is put's.
    unsafe { put(id, mig.compute_instance_id) }
}
