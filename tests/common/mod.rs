//! Test harness: a real payra server on ephemeral loopback ports, with a fresh development PKI
//! and a real sled database in temp dirs, and clients for every role.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use payra::ca::init_dev_pki;
use payra::client::{Client, Credential, DeviceKey};
use payra::clock::ManualClock;
use payra::config::Config;
use payra::server::RunningServer;
use payra::wire::proto;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub config: Config,
    server: Option<RunningServer>,
}

impl TestServer {
    /// Starts a server whose clock stands at the current system time.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after letting `adjust` change the config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        init_dev_pki(&dir.path().join("certs"), false).expect("dev PKI");
        let mut config = Config {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            certs_dir: dir.path().join("certs"),
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        adjust(&mut config);
        let clock = ManualClock::at_system_time();
        let server = payra::server::start(config.clone(), Arc::new(clock.clone()))
            .await
            .expect("server starts");
        TestServer {
            dir,
            clock,
            config,
            server: Some(server),
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.config.certs_dir.clone()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.server.as_ref().expect("running").http_addr
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.grpc_addr().port())
    }

    /// Stops the server and starts it again on the same certs and data, on new ports.
    pub async fn restart(&mut self) {
        self.server
            .take()
            .expect("running")
            .shutdown()
            .await
            .expect("clean shutdown");
        self.server = Some(
            payra::server::start(self.config.clone(), Arc::new(self.clock.clone()))
                .await
                .expect("server restarts"),
        );
    }

    pub async fn client(&self, credential: Credential) -> Client {
        Client::connect(&self.url(), &self.certs().join("root.pem"), &credential)
            .await
            .expect("client connects")
    }

    pub async fn service(&self) -> Client {
        self.client(Credential::role(&self.certs(), "service"))
            .await
    }

    pub async fn operator(&self) -> Client {
        self.client(Credential::role(&self.certs(), "operator"))
            .await
    }

    pub async fn anonymous(&self) -> Client {
        self.client(Credential::None).await
    }

    /// A fresh token for `customer`, created as the service.
    pub async fn token(&self, customer: &str) -> String {
        self.service()
            .await
            .create_enrollment_token(customer, 0)
            .await
            .expect("token")
            .token
    }

    /// Enrolls a fresh key for `customer` / `device`; returns the key and the response.
    pub async fn enroll(&self, customer: &str, device: &str) -> (DeviceKey, proto::EnrollResponse) {
        let token = self.token(customer).await;
        let key = DeviceKey::generate();
        let response = self
            .anonymous()
            .await
            .enroll(&token, key.csr_der(device).unwrap(), device, device_info())
            .await
            .expect("enroll");
        (key, response)
    }
}

pub fn device_info() -> proto::DeviceInfo {
    proto::DeviceInfo {
        platform: "android".into(),
        model: "Pixel 8".into(),
        os_version: "15".into(),
        app_version: "1.0.0".into(),
    }
}

pub fn pem(der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Runs openssl with `args`; returns (success, stdout + stderr).
pub fn openssl(args: &[&str]) -> (bool, String) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}
