//! `containerd-shim-hyperbox-v1 templates ...`: the template store for people.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use crate::distribution;
use crate::template::{self, Listed, Store};

const USAGE: &str = "\
usage: containerd-shim-hyperbox-v1 templates list [-n NAMESPACE [-p POD_NAMESPACE] | -A]
       containerd-shim-hyperbox-v1 templates inspect [-n NAMESPACE] [-p POD_NAMESPACE] NAME
       containerd-shim-hyperbox-v1 templates remove [-n NAMESPACE] [-p POD_NAMESPACE] NAME...
       containerd-shim-hyperbox-v1 templates push [-n NAMESPACE] [-p POD_NAMESPACE] NAME REF
       containerd-shim-hyperbox-v1 templates pull [-n NAMESPACE] [-p POD_NAMESPACE] REF [NAME]
           push and pull take --plain-http (else HTTPS, but for loopback registries) and
           --auth-file FILE (a Docker config.json; default $DOCKER_CONFIG/config.json, else
           ~/.docker/config.json, else the template settings' auth_file)

Templates are captured from containers annotated io.hyperbox.template.capture=NAME and
restored into containers annotated io.hyperbox.restore-from=NAME. NAMESPACE is the
containerd namespace (default: $CONTAINERD_NAMESPACE, else \"default\"); -A lists all.
A pushed template is an OCI artifact (application/vnd.hyperbox.template.v1); a pull
checks every part's digest and that this node can restore it (CRIU, shim, kernel, CPU),
and keeps it as the puller's. Under Kubernetes each pod namespace has templates of its own (POD_NAMESPACE, in containerd
namespace k8s.io); a listing of a namespace shows its pod namespaces' too, as NS/POD_NS.
The store is HYPERBOX_TEMPLATE_ROOT, else /var/lib/hyperbox/templates, root's only.";

struct Args {
    command: String,
    namespace: Option<String>,
    owner: Option<String>,
    all: bool,
    names: Vec<String>,
    plain_http: bool,
    auth_file: Option<std::path::PathBuf>,
}

fn parse(args: &[OsString]) -> Result<Args, String> {
    let mut words = args.iter().map(|a| a.to_string_lossy().into_owned());
    let command = words.next().ok_or("no templates command")?;
    let mut parsed = Args {
        command,
        namespace: None,
        owner: None,
        all: false,
        names: Vec::new(),
        plain_http: false,
        auth_file: None,
    };
    while let Some(w) = words.next() {
        match w.as_str() {
            "-n" | "--namespace" => {
                parsed.namespace = Some(words.next().ok_or(format!("{w} needs a value"))?)
            }
            "-p" | "--pod-namespace" => {
                parsed.owner = Some(words.next().ok_or(format!("{w} needs a value"))?)
            }
            "-A" | "--all-namespaces" => parsed.all = true,
            "--plain-http" => parsed.plain_http = true,
            "--auth-file" => {
                parsed.auth_file = Some(words.next().ok_or(format!("{w} needs a value"))?.into())
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            name => parsed.names.push(name.to_string()),
        }
    }
    Ok(parsed)
}

/// How push and pull reach the registry: the options, else the node's template settings.
fn access(args: &Args) -> Result<distribution::Access, String> {
    let settings = template::Settings::load().map_err(|e| e.to_string())?;
    let mut access = distribution::Access::of_node(&settings);
    if args.plain_http {
        access.plain_http = vec!["*".to_string()];
    }
    let docker = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))
        .map(|d| d.join("config.json"))
        .filter(|f| f.is_file());
    if let Some(file) = args.auth_file.clone().or(docker) {
        access.auth_file = Some(file);
    }
    Ok(access)
}

fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn age(created: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Runs `templates ARGS...`; `args` are those after `templates`.
pub fn templates(args: &[OsString]) -> ExitCode {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("templates: {e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("templates: only root may use templates: they hold the memory of processes");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("templates: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let root = template::root();
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("CONTAINERD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let owner = args.owner.as_deref();
    let store =
        |ns: &str, owner: Option<&str>| Store::scoped(&root, ns, owner).map_err(|e| e.to_string());
    let scope = match owner {
        Some(o) => format!("namespace {namespace}, pod namespace {o}"),
        None => format!("namespace {namespace}"),
    };
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
    };
    match args.command.as_str() {
        "list" | "ls" => {
            let namespaces = if args.all {
                Store::namespaces(&root)
            } else {
                vec![namespace]
            };
            say(format!(
                "{:<16} {:<24} {:>10} {:>5} {:<8} {:<8} FROM",
                "NAMESPACE", "NAME", "SIZE", "AGE", "CRIU", "SHIM"
            ));
            let mut stores = Vec::new();
            for ns in namespaces {
                let own = store(&ns, None)?;
                match owner {
                    Some(o) if !args.all => stores.push(store(&ns, Some(o))?),
                    _ => {
                        let owners = own.owners();
                        stores.push(own);
                        for o in owners {
                            stores.push(store(&ns, Some(&o))?);
                        }
                    }
                }
            }
            for s in stores {
                let ns = match s.owner() {
                    Some(o) => format!("{}/{o}", s.namespace()),
                    None => s.namespace().to_string(),
                };
                for entry in s.list() {
                    match entry {
                        Listed::Template { record, bytes, .. } => say(format!(
                            "{:<16} {:<24} {:>10} {:>5} {:<8} {:<8} {}",
                            ns,
                            record.name,
                            human(bytes),
                            age(record.created),
                            record.criu_version,
                            record.shim_version,
                            record.image.as_deref().unwrap_or(&record.container)
                        )),
                        Listed::Failed { name, reason } => say(format!(
                            "{:<16} {:<24} capture failed: {}",
                            ns,
                            name,
                            reason.trim()
                        )),
                    }
                }
            }
            Ok(())
        }
        "inspect" => {
            let [name] = args.names.as_slice() else {
                return Err("inspect takes one NAME".into());
            };
            let s = store(&namespace, owner)?;
            let found = s.list().into_iter().find(|l| l.name() == name);
            match found {
                Some(Listed::Template {
                    record,
                    path,
                    bytes,
                }) => {
                    let mut v = serde_json::to_value(&record).map_err(|e| e.to_string())?;
                    v["path"] = path.display().to_string().into();
                    v["bytes"] = bytes.into();
                    say(serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
                    Ok(())
                }
                Some(Listed::Failed { reason, .. }) => Err(format!(
                    "template {name}: capture failed: {}",
                    reason.trim()
                )),
                None => Err(format!("template {name} does not exist in {scope}")),
            }
        }
        "remove" | "rm" => {
            if args.names.is_empty() {
                return Err("remove takes at least one NAME".into());
            }
            let s = store(&namespace, owner)?;
            let mut missing = Vec::new();
            for name in &args.names {
                match s.remove(name) {
                    Ok(true) => say(name.clone()),
                    Ok(false) => missing.push(name.clone()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("no template {} in {scope}", missing.join(", ")))
            }
        }
        "push" => {
            let [name, reference] = args.names.as_slice() else {
                return Err("push takes NAME and REF".into());
            };
            let s = store(&namespace, owner)?;
            let pushed = distribution::push(&s, name, reference, &access(args)?)?;
            say(format!(
                "pushed template {name} to {}@{} ({})",
                pushed.reference,
                pushed.digest,
                human(pushed.bytes)
            ));
            Ok(())
        }
        "pull" => {
            let (reference, name) = match args.names.as_slice() {
                [r] => (r, None),
                [r, n] => (r, Some(n.as_str())),
                _ => return Err("pull takes REF and, if it is to be another, NAME".into()),
            };
            let s = store(&namespace, owner)?;
            let pulled = distribution::pull(&s, reference, name, &access(args)?, None, false)?;
            say(format!(
                "pulled template {} from {reference}@{} into {scope}: {} ({})",
                pulled.name,
                pulled.digest,
                pulled.path.display(),
                human(pulled.bytes)
            ));
            Ok(())
        }
        other => Err(format!("unknown templates command {other:?}\n{USAGE}")),
    }
}
