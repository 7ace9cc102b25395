//! `containerd-shim-hyperbox-v1`: Linux containers under containerd through youki's
//! `libcontainer`, in-process. See `DESIGN.md` for how containers are created without
//! forking the multi-threaded shim.

fn main() -> std::process::ExitCode {
    hyperbox_shim_core::run("io.containerd.hyperbox.v1", hyperbox_shim_youki::prepare)
}
