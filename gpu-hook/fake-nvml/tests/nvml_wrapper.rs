//! The built fake library, copied as `libnvidia-ml.so.1` next to a description, loaded the
//! way the generator loads NVML (`nvml-wrapper`, `Nvml::builder().lib_path(…)`), and called
//! directly through its C ABI for the return codes `nvml-wrapper` hides.
//!
//! The library is the package's cdylib. `cargo test -p hyperbox-fake-nvml` builds it before
//! the tests because the package's library is also an rlib (a cdylib-only library is built
//! for no test), into `target/<profile>/deps/`, the test binary's own directory (a `cargo
//! build` also copies it to `target/<profile>/`): found from `std::env::current_exe()`.

use std::ffi::{c_char, c_uint, c_void, CStr, CString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nvml_wrapper::enum_wrappers::device::Brand;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde_json::json;

const LIB: &str = "libhyperbox_fake_nvml.so";

/// The cdylib cargo built for this test run.
fn built_library() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test binary's directory");
    let profile = deps.parent().expect("the profile directory");
    // deps/ first: `cargo test` refreshes it, while the copy in the profile directory is only
    // refreshed by a `cargo build` naming this package.
    [deps.join(LIB), profile.join(LIB)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{LIB} not found in {} or its deps/", profile.display()))
}

/// A fresh directory holding a copy of the library as `libnvidia-ml.so.1`, removed on drop.
struct Scratch {
    dir: PathBuf,
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    fn new(name: &str, description: Option<&serde_json::Value>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hb-fake-nvml-{name}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // Made first, so that a failure below still removes the directory.
        let scratch = Scratch { dir };
        fs::copy(built_library(), scratch.lib()).unwrap();
        if let Some(description) = description {
            fs::write(
                scratch.dir.join("hyperbox-fake-nvml.json"),
                serde_json::to_vec_pretty(description).unwrap(),
            )
            .unwrap();
        }
        scratch
    }

    fn lib(&self) -> PathBuf {
        self.dir.join("libnvidia-ml.so.1")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("hyperbox-fake-nvml.log")).unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

const GPU0_UUID: &str = "GPU-8f6c1a2e-0d4b-4c61-9e5a-3b7f2c1d0e01";
const GPU1_UUID: &str = "GPU-1d2e3f40-5a6b-4c7d-8e9f-a0b1c2d3e4f5";
const MIG0_UUID: &str = "MIG-5c8d2a1b-7e3f-5a9c-b1d2-e3f4a5b6c7d8";
const MIG1_UUID: &str = "MIG-9a8b7c6d-5e4f-5a3b-8c2d-1e0f9a8b7c6d";

/// Two GPUs, the MIG one first in the file but second on the bus (NVML's order).
fn two_gpus() -> serde_json::Value {
    json!({
        "driver_version": "550.54.15",
        "cuda_version": 12040,
        "gpus": [
            {
                "name": "NVIDIA A100-SXM4-40GB",
                "uuid": GPU1_UUID,
                "minor": 1,
                "bus_id": "0000:af:00.0",
                "pci_device_id": 0x20B0_10DE_u32,
                "pci_subsystem_id": 0x134F_10DE_u32,
                "brand": 2,
                "compute_capability": [8, 0],
                "mig": {
                    "enabled": true,
                    "max_devices": 7,
                    "devices": [
                        { "uuid": MIG0_UUID, "gpu_instance_id": 1, "compute_instance_id": 0 },
                        { "uuid": MIG1_UUID, "gpu_instance_id": 2, "compute_instance_id": 0 }
                    ]
                }
            },
            {
                "name": "NVIDIA A100-SXM4-40GB",
                "uuid": GPU0_UUID,
                "minor": 0,
                "bus_id": "00000000:3B:00.0",
                "pci_device_id": 0x20B0_10DE_u32,
                "brand": 2,
                "compute_capability": [8, 0]
            }
        ]
    })
}

fn init(lib: &Path) -> Result<Nvml, NvmlError> {
    Nvml::builder().lib_path(lib.as_os_str()).init()
}

#[test]
fn answers_what_the_generator_reads() {
    let scratch = Scratch::new("wrapper", Some(&two_gpus()));
    let nvml = init(&scratch.lib()).expect("init");

    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12040);
    assert_eq!(nvml.device_count().unwrap(), 2);

    let gpu0 = nvml.device_by_index(0).unwrap();
    assert_eq!(gpu0.index().unwrap(), 0);
    assert_eq!(gpu0.uuid().unwrap(), GPU0_UUID);
    assert_eq!(gpu0.minor_number().unwrap(), 0);
    assert_eq!(gpu0.name().unwrap(), "NVIDIA A100-SXM4-40GB");
    assert_eq!(gpu0.brand().unwrap(), Brand::Tesla);
    let cc = gpu0.cuda_compute_capability().unwrap();
    assert_eq!((cc.major, cc.minor), (8, 0));
    let pci = gpu0.pci_info().unwrap();
    assert_eq!(pci.bus_id, "00000000:3B:00.0");
    assert_eq!((pci.domain, pci.bus, pci.device), (0, 0x3b, 0));
    assert_eq!(pci.pci_device_id, 0x20B0_10DE);
    assert_eq!(pci.pci_sub_system_id, Some(0));
    assert!(!gpu0.mig_is_mig_device_handle().unwrap());
    assert!(matches!(gpu0.mig_mode(), Err(NvmlError::NotSupported)));
    assert_eq!(
        gpu0.mig_device_count().unwrap(),
        0,
        "zero when not MIG capable"
    );
    assert!(matches!(
        gpu0.mig_device_by_index(0),
        Err(NvmlError::NotSupported)
    ));

    let gpu1 = nvml.device_by_index(1).unwrap();
    assert_eq!(gpu1.index().unwrap(), 1);
    assert_eq!(gpu1.uuid().unwrap(), GPU1_UUID);
    assert_eq!(gpu1.minor_number().unwrap(), 1);
    let pci = gpu1.pci_info().unwrap();
    assert_eq!(
        pci.bus_id, "00000000:AF:00.0",
        "NVML's form, whatever the file's"
    );
    assert_eq!(pci.bus, 0xaf);
    assert_eq!(pci.pci_sub_system_id, Some(0x134F_10DE));
    let mode = gpu1.mig_mode().unwrap();
    assert_eq!((mode.current, mode.pending), (1, 1));
    assert_eq!(gpu1.mig_device_count().unwrap(), 7);
    assert!(matches!(
        nvml.device_by_index(2),
        Err(NvmlError::InvalidArg)
    ));

    // The generator's MIG walk: every index below the maximum, NOT_FOUND for the gaps.
    let mut migs = Vec::new();
    for i in 0..gpu1.mig_device_count().unwrap() {
        match gpu1.mig_device_by_index(i) {
            Ok(mig) => migs.push(mig),
            Err(NvmlError::NotFound) => {}
            Err(e) => panic!("MIG device {i}: {e}"),
        }
    }
    assert!(matches!(
        gpu1.mig_device_by_index(7),
        Err(NvmlError::InvalidArg)
    ));
    let uuids: Vec<String> = migs.iter().map(|m| m.uuid().unwrap()).collect();
    assert_eq!(uuids, [MIG0_UUID, MIG1_UUID]);
    let raw = Raw::open(&scratch.lib());
    for (mig, gi) in migs.iter().zip([1, 2]) {
        assert!(mig.mig_is_mig_device_handle().unwrap());
        assert_eq!(mig.name().unwrap(), "NVIDIA A100-SXM4-40GB MIG");
        assert_eq!(mig.minor_number().unwrap(), 1, "the parent's");
        assert_eq!(mig.mig_parent_device().unwrap().uuid().unwrap(), GPU1_UUID);
        assert!(matches!(mig.index(), Err(NvmlError::NotSupported)));
        // SAFETY: the handle came from this library, which stays loaded.
        let handle = unsafe { mig.handle() }.cast::<c_void>();
        assert_eq!(raw.instance_ids(handle), Ok((gi, 0)));
    }
    // SAFETY: as above.
    let gpu_handle = unsafe { gpu1.handle() }.cast::<c_void>();
    assert_eq!(
        raw.instance_ids(gpu_handle),
        Err(3),
        "NOT_SUPPORTED on a GPU"
    );
    assert!(matches!(
        gpu1.mig_parent_device(),
        Err(NvmlError::InvalidArg)
    ));

    let exe = fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(
        scratch.log(),
        format!("init pid={} exe={}\n", std::process::id(), exe.display())
    );
    nvml.shutdown().expect("shutdown");
}

#[test]
fn no_description_is_no_driver() {
    let scratch = Scratch::new("nodriver", None);
    assert!(matches!(
        init(&scratch.lib()),
        Err(NvmlError::DriverNotLoaded)
    ));
    assert_eq!(scratch.log(), "", "a failed init is not logged");
}

#[test]
fn a_bad_description_fails_init() {
    let mut description = two_gpus();
    description["gpus"][0]["colour"] = json!("green");
    let scratch = Scratch::new("unknown-field", Some(&description));
    assert!(matches!(init(&scratch.lib()), Err(NvmlError::Unknown)));

    let mut description = two_gpus();
    description["gpus"][0]["bus_id"] = json!("3b:00.0");
    let scratch = Scratch::new("bad-bus", Some(&description));
    assert!(matches!(init(&scratch.lib()), Err(NvmlError::Unknown)));
    assert_eq!(scratch.log(), "");
}

// ----------------------------------------------------------------------------------------
// The C ABI directly, through dlopen.

type Ret = c_uint;
type Device = *mut c_void;

struct Raw {
    handle: *mut c_void,
}

impl Raw {
    /// `dlopen`s `lib` (the same loaded object as `nvml-wrapper`'s when the path is the same).
    fn open(lib: &Path) -> Self {
        let path = CString::new(lib.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; the object's constructors are Rust's own.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {}", lib.display());
        Raw { handle }
    }

    /// The address of `name`, transmuted by the caller to its NVML signature.
    fn sym(&self, name: &str) -> *mut c_void {
        let name = CString::new(name).unwrap();
        // SAFETY: a live handle from dlopen and a NUL-terminated name.
        let sym = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!sym.is_null(), "{name:?} is exported");
        sym
    }

    fn call0(&self, name: &str) -> Ret {
        // SAFETY: `name` is an NVML function taking no argument.
        let f: unsafe extern "C" fn() -> Ret = unsafe { std::mem::transmute(self.sym(name)) };
        // SAFETY: no argument to get wrong.
        unsafe { f() }
    }

    fn count(&self) -> (Ret, c_uint) {
        let mut n: c_uint = 0;
        // SAFETY: nvmlDeviceGetCount_v2(unsigned int *).
        let f: unsafe extern "C" fn(*mut c_uint) -> Ret =
            unsafe { std::mem::transmute(self.sym("nvmlDeviceGetCount_v2")) };
        // SAFETY: a valid output.
        (unsafe { f(&mut n) }, n)
    }

    fn handle(&self, index: c_uint) -> (Ret, Device) {
        let mut d: Device = std::ptr::null_mut();
        // SAFETY: nvmlDeviceGetHandleByIndex_v2(unsigned int, nvmlDevice_t *).
        let f: unsafe extern "C" fn(c_uint, *mut Device) -> Ret =
            unsafe { std::mem::transmute(self.sym("nvmlDeviceGetHandleByIndex_v2")) };
        // SAFETY: a valid output.
        (unsafe { f(index, &mut d) }, d)
    }

    fn uuid(&self, device: Device, length: c_uint) -> (Ret, String) {
        let mut buf = vec![0 as c_char; 96];
        // SAFETY: nvmlDeviceGetUUID(nvmlDevice_t, char *, unsigned int).
        let f: unsafe extern "C" fn(Device, *mut c_char, c_uint) -> Ret =
            unsafe { std::mem::transmute(self.sym("nvmlDeviceGetUUID")) };
        // SAFETY: `buf` holds 96 >= length bytes.
        let ret = unsafe { f(device, buf.as_mut_ptr(), length.min(96)) };
        // SAFETY: zero-initialised, so NUL-terminated within its 96 bytes.
        let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
        (ret, text.to_string_lossy().into_owned())
    }

    fn driver_version(&self, length: c_uint) -> Ret {
        let mut buf = vec![0 as c_char; 80];
        // SAFETY: nvmlSystemGetDriverVersion(char *, unsigned int).
        let f: unsafe extern "C" fn(*mut c_char, c_uint) -> Ret =
            unsafe { std::mem::transmute(self.sym("nvmlSystemGetDriverVersion")) };
        // SAFETY: `buf` holds 80 >= length bytes.
        unsafe { f(buf.as_mut_ptr(), length.min(80)) }
    }

    fn mig_by_index(&self, device: Device, index: c_uint) -> Ret {
        let mut d: Device = std::ptr::null_mut();
        // SAFETY: nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t, unsigned int, nvmlDevice_t *).
        let f: unsafe extern "C" fn(Device, c_uint, *mut Device) -> Ret =
            unsafe { std::mem::transmute(self.sym("nvmlDeviceGetMigDeviceHandleByIndex")) };
        // SAFETY: a valid output.
        unsafe { f(device, index, &mut d) }
    }

    /// GPU and compute instance ids, or the first failing return code.
    fn instance_ids(&self, device: Device) -> Result<(c_uint, c_uint), Ret> {
        let mut ids = [0 as c_uint; 2];
        for (name, out) in [
            "nvmlDeviceGetGpuInstanceId",
            "nvmlDeviceGetComputeInstanceId",
        ]
        .into_iter()
        .zip(ids.iter_mut())
        {
            // SAFETY: both are (nvmlDevice_t, unsigned int *).
            let f: unsafe extern "C" fn(Device, *mut c_uint) -> Ret =
                unsafe { std::mem::transmute(self.sym(name)) };
            // SAFETY: a valid output.
            match unsafe { f(device, out) } {
                0 => {}
                ret => return Err(ret),
            }
        }
        Ok((ids[0], ids[1]))
    }

    fn error_string(&self, ret: Ret) -> String {
        // SAFETY: nvmlErrorString(nvmlReturn_t) -> const char *.
        let f: unsafe extern "C" fn(Ret) -> *const c_char =
            unsafe { std::mem::transmute(self.sym("nvmlErrorString")) };
        // SAFETY: a static NUL-terminated string of the library.
        unsafe { CStr::from_ptr(f(ret)) }
            .to_string_lossy()
            .into_owned()
    }
}

#[test]
fn return_codes_of_the_c_abi() {
    let scratch = Scratch::new("raw", Some(&two_gpus()));
    let raw = Raw::open(&scratch.lib());

    // Before init.
    assert_eq!(raw.count().0, 1, "UNINITIALIZED");
    assert_eq!(raw.call0("nvmlShutdown"), 1);
    assert_eq!(raw.error_string(1), "Uninitialized");
    assert_eq!(raw.error_string(7), "Insufficient Size");
    assert_eq!(raw.error_string(12345), "Unknown Error");

    // Inits nest; each is logged.
    assert_eq!(raw.call0("nvmlInit_v2"), 0);
    // SAFETY: nvmlInitWithFlags(unsigned int).
    let with_flags: unsafe extern "C" fn(c_uint) -> Ret =
        unsafe { std::mem::transmute(raw.sym("nvmlInitWithFlags")) };
    // SAFETY: any flags.
    assert_eq!(unsafe { with_flags(0) }, 0);
    assert_eq!(scratch.log().lines().count(), 2);
    assert_eq!(raw.count(), (0, 2));

    let (ret, gpu1) = raw.handle(1);
    assert_eq!(ret, 0);
    assert_eq!(raw.handle(2).0, 2, "INVALID_ARGUMENT for a bad index");
    assert_eq!(raw.uuid(gpu1, 96), (0, GPU1_UUID.to_owned()));
    let exact = GPU1_UUID.len() as c_uint + 1;
    assert_eq!(raw.uuid(gpu1, exact).0, 0, "room for the NUL is enough");
    assert_eq!(raw.uuid(gpu1, exact - 1).0, 7, "INSUFFICIENT_SIZE");
    assert_eq!(raw.driver_version(9), 7, "550.54.15 needs 10 bytes");
    assert_eq!(raw.driver_version(10), 0);
    let mut bogus = 0u64;
    let bogus: Device = (&mut bogus as *mut u64).cast();
    assert_eq!(raw.uuid(bogus, 96).0, 2, "a handle not handed out");
    assert_eq!(raw.mig_by_index(gpu1, 1), 0);
    assert_eq!(raw.mig_by_index(gpu1, 2), 6, "NOT_FOUND below the maximum");
    assert_eq!(
        raw.mig_by_index(gpu1, 7),
        2,
        "INVALID_ARGUMENT from the maximum"
    );
    let (_, gpu0) = raw.handle(0);
    assert_eq!(raw.mig_by_index(gpu0, 0), 3, "NOT_SUPPORTED without MIG");

    // The second shutdown ends the session.
    assert_eq!(raw.call0("nvmlShutdown"), 0);
    assert_eq!(raw.count(), (0, 2), "one init still open");
    assert_eq!(raw.call0("nvmlShutdown"), 0);
    assert_eq!(raw.count().0, 1, "UNINITIALIZED after the last shutdown");
    assert_eq!(raw.uuid(gpu1, 96).0, 1);
    assert_eq!(raw.call0("nvmlShutdown"), 1);

    // A new session reads the description again: a vanished driver is seen.
    fs::remove_file(scratch.dir.join("hyperbox-fake-nvml.json")).unwrap();
    assert_eq!(raw.call0("nvmlInit_v2"), 9, "DRIVER_NOT_LOADED");
    assert_eq!(scratch.log().lines().count(), 2);
}
