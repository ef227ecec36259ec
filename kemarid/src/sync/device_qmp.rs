//! [`DeviceState`] of an HVM guest's QEMU, over QMP ([`crate::qmp`]): each save stops the
//! device model and saves its state like libxl (`stop`, `xen-save-devices-state` with
//! `live: false` into a dom0 file read back and removed); `resumed` lets it run again (`cont`);
//! the initial image also carries QEMU's `physmap` xenstore entries, as `xl save` does; while
//! the guest is protected QEMU reports its own writes to guest memory to Xen's log-dirty
//! bitmap (`xen-set-global-dirty-log`, as libxl sets it for a live save).

use hypervisor::{DomId, XenStore};

use super::sender::{DeviceError, DeviceState};
use crate::qmp::QmpDeviceModel;
use crate::xlsave::emulator_xenstore_data;

/// The device model of one HVM domain.
#[derive(Debug)]
pub struct QmpDeviceState {
    domid: DomId,
    model: QmpDeviceModel,
    xenstore: Box<dyn XenStore>,
    stopped: bool,
}

impl QmpDeviceState {
    /// The QEMU of `domid` at libxl's QMP socket; `xenstore` reads its `physmap` entries.
    pub fn for_domain(domid: DomId, xenstore: Box<dyn XenStore>) -> QmpDeviceState {
        QmpDeviceState::new(domid, QmpDeviceModel::for_domain(domid), xenstore)
    }

    /// A device model reached through `model`.
    pub fn new(domid: DomId, model: QmpDeviceModel, xenstore: Box<dyn XenStore>) -> QmpDeviceState {
        QmpDeviceState {
            domid,
            model,
            xenstore,
            stopped: false,
        }
    }
}

impl DeviceState for QmpDeviceState {
    fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        // `stop` comes first: from here on the device model must be restarted.
        self.stopped = true;
        Ok(self.model.stop_and_save()?)
    }

    fn resumed(&mut self) -> Result<(), DeviceError> {
        if self.stopped {
            self.model.connect()?.cont()?;
            self.stopped = false;
        }
        Ok(())
    }

    fn xenstore_data(&mut self) -> Result<Option<Vec<u8>>, DeviceError> {
        let data = emulator_xenstore_data(self.xenstore.as_ref(), self.domid)?;
        Ok((!data.is_empty()).then_some(data))
    }

    fn track_writes(&mut self, enable: bool) -> Result<(), DeviceError> {
        Ok(self.model.set_global_dirty_log(enable)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::mem::MemXen;
    use hypervisor::{Hypervisor, Tx};
    use serde_json::{json, Value};
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake QEMU serving `sessions` QMP sessions; records the commands it ran.
    fn fake_qemu(
        socket: PathBuf,
        sessions: usize,
        log: Arc<Mutex<Vec<String>>>,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for _ in 0..sessions {
                let (stream, _) = listener.accept().unwrap();
                let mut w = stream.try_clone().unwrap();
                w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                    .unwrap();
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let req: Value = serde_json::from_str(&line).unwrap();
                    let cmd = req["execute"].as_str().unwrap().to_string();
                    if cmd == "xen-save-devices-state" {
                        let file = req["arguments"]["filename"].as_str().unwrap();
                        std::fs::write(file, b"QEVM state").unwrap();
                    }
                    if cmd == "xen-set-global-dirty-log" {
                        let on = req["arguments"]["enable"].as_bool().unwrap();
                        log.lock().unwrap().push(format!("{cmd} {on}"));
                    } else {
                        log.lock().unwrap().push(cmd);
                    }
                    let reply = json!({"return": {}, "id": req["id"]});
                    if w.write_all(format!("{reply}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            }
        })
    }

    #[test]
    fn tracking_save_stops_resumed_continues_and_xenstore_data_is_collected() {
        let dir = std::env::temp_dir().join(format!("kemari-devqmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = Dir(dir);
        let socket = dir.0.join("qmp-libxl-4");
        let log = Arc::new(Mutex::new(Vec::new()));
        // dirty tracking on, save (stop + save), resumed (cont), dirty tracking off: one
        // session each
        let server = fake_qemu(socket.clone(), 4, log.clone());
        let xen = MemXen::new();
        let xs = xen.open_xenstore().unwrap();
        let base = "/local/domain/0/device-model/4/physmap/f0000000";
        xs.write(Tx::NONE, &format!("{base}/start_addr"), b"f0000000")
            .unwrap();
        xs.write(Tx::NONE, &format!("{base}/size"), b"1000")
            .unwrap();
        xs.write(Tx::NONE, &format!("{base}/name"), b"rom").unwrap();
        let mut dev = QmpDeviceState::new(
            4,
            QmpDeviceModel::new(socket, dir.0.clone(), Duration::from_secs(5)),
            xen.open_xenstore().unwrap(),
        );
        dev.track_writes(true).unwrap();
        assert_eq!(dev.save().unwrap(), b"QEVM state");
        dev.resumed().unwrap();
        // a second resumed without a save does not talk to QEMU
        dev.resumed().unwrap();
        dev.track_writes(false).unwrap();
        server.join().unwrap();
        let cmds: Vec<String> = log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c != "qmp_capabilities")
            .cloned()
            .collect();
        assert_eq!(
            cmds,
            [
                "xen-set-global-dirty-log true",
                "stop",
                "xen-save-devices-state",
                "cont",
                "xen-set-global-dirty-log false"
            ]
        );
        let data = dev.xenstore_data().unwrap().unwrap();
        assert!(data.starts_with(b"physmap/f0000000/start_addr\0f0000000\0"));
    }

    #[test]
    fn no_physmap_means_no_xenstore_record() {
        let xen = MemXen::new();
        let mut dev = QmpDeviceState::new(
            9,
            QmpDeviceModel::new(
                PathBuf::from("/nonexistent/qmp"),
                std::env::temp_dir(),
                Duration::from_secs(1),
            ),
            xen.open_xenstore().unwrap(),
        );
        assert_eq!(dev.xenstore_data().unwrap(), None);
        let err = dev.save().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/qmp"), "{err}");
    }
}
