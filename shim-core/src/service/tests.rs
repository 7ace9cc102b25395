//! The service driven through its handlers, with a stub engine and a channel for its events:
//! the order of the events containerd sees, and the exits that come before their pid is
//! known or while an exec still runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{
    CreateTaskRequest, DeleteRequest, ExecProcessRequest, StartRequest, WaitRequest,
};
use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::ExitSignal;
use tokio::sync::mpsc;

use crate::engine::{CreateSpec, Engine, ExecSpec, ProcessStdio, Spawned};
use crate::error::EngineError;
use crate::reaper::Reaped;

use super::{Events, Inner, TaskService};

/// Events as the service emitted them: topic, and for a TaskExit, the process's id.
struct Channel(mpsc::UnboundedSender<(String, Option<String>)>);

#[async_trait]
impl Events for Channel {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let exit = event.downcast_ref::<TaskExit>().map(|e| e.id.clone());
        let _ = self.0.send((topic.to_string(), exit));
    }
}

/// An engine that runs nothing: pids are numbers it hands out, and its processes "exit" when
/// the test reports them reaped. With `exit_during_create`, the init is reaped before
/// `create` returns its pid (a restored process that ends at once).
#[derive(Debug)]
struct Stub {
    next_pid: AtomicU32,
    reaped: mpsc::UnboundedSender<Reaped>,
    exit_during_create: bool,
    calls: Mutex<Vec<String>>,
    /// The service over it, to see an exit kept aside.
    service: OnceLock<Weak<Inner>>,
}

impl Stub {
    fn pid(&self) -> u32 {
        self.next_pid.fetch_add(1, Ordering::SeqCst)
    }

    fn called(&self, what: impl Into<String>) {
        self.calls.lock().unwrap().push(what.into());
    }
}

#[async_trait]
impl Engine for Stub {
    async fn create(&self, spec: &CreateSpec, _: ProcessStdio) -> Result<Spawned, EngineError> {
        self.called(format!("create {}", spec.id));
        let pid = self.pid();
        if self.exit_during_create {
            let _ = self.reaped.send(reaped(pid, 3));
            // The service's reaper task keeps it aside before the pid is returned.
            let inner = self
                .service
                .get()
                .and_then(Weak::upgrade)
                .expect("service set");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !inner.early().exits.contains_key(&pid) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "exit never kept aside"
                );
                tokio::task::yield_now().await;
            }
        }
        Ok(Spawned {
            pid,
            console: None,
            cgroups_path: None,
        })
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.called(format!("start {id}"));
        Ok(())
    }

    async fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        _: ProcessStdio,
    ) -> Result<Spawned, EngineError> {
        self.called(format!("exec {id} {}", spec.exec_id));
        Ok(Spawned {
            pid: self.pid(),
            console: None,
            cgroups_path: None,
        })
    }

    async fn signal_all(&self, id: &str, signal: i32) -> Result<(), EngineError> {
        self.called(format!("signal_all {id} {signal}"));
        Ok(())
    }

    async fn pids(&self, _: &str) -> Result<Vec<u32>, EngineError> {
        Ok(Vec::new())
    }

    async fn cgroups_path(&self, id: &str) -> Result<PathBuf, EngineError> {
        Err(EngineError::NotFound(format!(
            "the stub has no cgroup for {id}"
        )))
    }

    async fn delete(&self, id: &str, _: &Path) -> Result<(), EngineError> {
        self.called(format!("delete {id}"));
        Ok(())
    }
}

fn reaped(pid: u32, status: u32) -> Reaped {
    Reaped {
        pid,
        status,
        at: SystemTime::now(),
    }
}

struct Harness {
    service: TaskService,
    engine: Arc<Stub>,
    reaped: mpsc::UnboundedSender<Reaped>,
    events: mpsc::UnboundedReceiver<(String, Option<String>)>,
    bundle: PathBuf,
}

impl Harness {
    fn new(name: &str, exit_during_create: bool) -> Harness {
        let bundle = std::env::temp_dir().join(format!("hb-service-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        // A pid namespace of its own: nothing to kill after the init exits.
        std::fs::write(
            bundle.join("config.json"),
            r#"{"linux":{"namespaces":[{"type":"pid"}]}}"#,
        )
        .unwrap();
        let (reaped_tx, reaped_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let engine = Arc::new(Stub {
            next_pid: AtomicU32::new(1000),
            reaped: reaped_tx.clone(),
            exit_during_create,
            calls: Mutex::new(Vec::new()),
            service: OnceLock::new(),
        });
        let service = TaskService::with_events(
            engine.clone(),
            Arc::new(Channel(events_tx)),
            "default".into(),
            Arc::new(ExitSignal::default()),
            reaped_rx,
        );
        let _ = engine.service.set(Arc::downgrade(&service.inner));
        Harness {
            service,
            engine,
            reaped: reaped_tx,
            events,
            bundle,
        }
    }

    async fn create(&self, id: &str) -> u32 {
        let req = CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle.to_string_lossy().into_owned(),
            ..Default::default()
        };
        self.service.inner.create(req).await.unwrap().pid
    }

    async fn start(&self, id: &str, exec_id: &str) -> u32 {
        let req = StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.service.inner.start(req).await.unwrap().pid
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let req = WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let wait = self.service.inner.wait(req);
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("Wait answers once the exit is reaped")
            .unwrap()
            .exit_status
    }

    async fn delete(&self, id: &str) -> u32 {
        let req = DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        self.service.inner.delete(req).await.unwrap().exit_status
    }

    /// The events emitted so far, as `topic` or `topic id` for exits.
    fn events(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok((topic, exit)) = self.events.try_recv() {
            out.push(match exit {
                Some(id) => format!("{topic} {id}"),
                None => topic,
            });
        }
        out
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// Waits (a bounded while) until the service has emitted `n` events in all.
async fn settle(h: &mut Harness, seen: &mut Vec<String>, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while seen.len() < n {
        seen.extend(h.events());
        if tokio::time::Instant::now() > deadline {
            panic!("{n} events expected, got {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn exit_topic(id: &str) -> String {
    format!("{} {id}", topics::TASK_EXIT_EVENT_TOPIC)
}

#[tokio::test]
async fn a_lifecycle_emits_create_start_exit_delete_in_order() {
    let mut h = Harness::new("lifecycle", false);
    let pid = h.create("c1").await;
    assert_eq!(h.start("c1", "").await, pid);
    h.reaped.send(reaped(pid, 7)).unwrap();
    assert_eq!(h.wait("c1", "").await, 7);
    assert_eq!(h.delete("c1").await, 7);
    let mut seen = Vec::new();
    settle(&mut h, &mut seen, 4).await;
    assert_eq!(
        seen,
        [
            topics::TASK_CREATE_EVENT_TOPIC.to_string(),
            topics::TASK_START_EVENT_TOPIC.to_string(),
            exit_topic("c1"),
            topics::TASK_DELETE_EVENT_TOPIC.to_string(),
        ]
    );
    assert_eq!(
        *h.engine.calls.lock().unwrap(),
        ["create c1", "start c1", "delete c1"]
    );
    // Gone from the table: a second Delete finds nothing.
    let again = h
        .service
        .inner
        .delete(DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        again.code(),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
}

#[tokio::test]
async fn an_exit_reaped_before_its_pid_is_known_is_reported_after_task_create() {
    let mut h = Harness::new("early", true);
    let pid = h.create("c2").await;
    // The exit was kept aside during the spawn and handed over once the pid was recorded.
    assert_eq!(h.wait("c2", "").await, 3);
    let mut seen = Vec::new();
    settle(&mut h, &mut seen, 2).await;
    assert_eq!(
        seen,
        [
            topics::TASK_CREATE_EVENT_TOPIC.to_string(),
            exit_topic("c2")
        ]
    );
    assert!(pid >= 1000);
    assert_eq!(h.delete("c2").await, 3);
}

#[tokio::test]
async fn the_inits_exit_waits_for_a_running_execs_exit() {
    let mut h = Harness::new("exec", false);
    let pid = h.create("c3").await;
    h.start("c3", "").await;
    let spec = serde_json::to_vec(&serde_json::json!({"args": ["true"], "cwd": "/"})).unwrap();
    h.service
        .inner
        .exec(ExecProcessRequest {
            id: "c3".into(),
            exec_id: "e1".into(),
            spec: Some(Any {
                value: spec,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let exec_pid = h.start("c3", "e1").await;
    let mut seen = Vec::new();
    settle(&mut h, &mut seen, 4).await;
    // The init dies first: Wait answers at once, but its TaskExit is held while the exec
    // can still report one (containerd takes the init's exit as the container's end).
    h.reaped.send(reaped(pid, 0)).unwrap();
    assert_eq!(h.wait("c3", "").await, 0);
    let held = h.service.inner.table()["c3"].init.held_exit.is_some();
    assert!(held, "the init's exit was not held");
    seen.extend(h.events());
    assert_eq!(seen.len(), 4, "the init's exit went out early: {seen:?}");
    h.reaped.send(reaped(exec_pid, 137)).unwrap();
    assert_eq!(h.wait("c3", "e1").await, 137);
    settle(&mut h, &mut seen, 6).await;
    assert_eq!(
        seen,
        [
            topics::TASK_CREATE_EVENT_TOPIC.to_string(),
            topics::TASK_START_EVENT_TOPIC.to_string(),
            topics::TASK_EXEC_ADDED_EVENT_TOPIC.to_string(),
            topics::TASK_EXEC_STARTED_EVENT_TOPIC.to_string(),
            exit_topic("e1"),
            exit_topic("c3"),
        ]
    );
}
