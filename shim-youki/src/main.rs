//! `containerd-shim-hyperbox-v1`: Linux containers under containerd through youki's
//! `libcontainer`, in-process. See `DESIGN.md` for how containers are created without
//! forking the multi-threaded shim. `containerd-shim-hyperbox-v1 templates ...` manages the
//! templates that containers are captured as and restored from.

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "templates") {
        return hyperbox_shim_youki::templates(&args[2..]);
    }
    hyperbox_shim_core::run(
        "io.containerd.hyperbox.v1",
        hyperbox_shim_youki::prepare,
        hyperbox_shim_youki::oci_features,
    )
}
