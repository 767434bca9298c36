//! A slow way to the apiserver: what a loaded or distant apiserver looks like to a client.

use std::path::PathBuf;
use std::time::Duration;

use super::controlplane::ControlPlane;

/// A way to the apiserver at `server` (`https://host:port`) that holds what a client sends
/// `delay` before passing it on, as a loaded or distant apiserver answers later: requests in
/// flight together (each on its own connection) wait together, one after another add up.
/// Returns its own `https://` address (the same IP, so the serving certificate still fits).
/// Threads, not tasks: the test's runtime has one thread, which waits on the operator.
pub fn slow_link(server: &str, delay: Duration) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let upstream = server.trim_start_matches("https://").to_string();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let address = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(&upstream) else { continue };
            let (Ok(mut from_client), Ok(mut to_client), Ok(mut from_server)) =
                (client.try_clone(), client.try_clone(), server.try_clone())
            else {
                continue;
            };
            let mut to_server = server;
            std::thread::spawn(move || {
                let mut buffer = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = from_client.read(&mut buffer) {
                    std::thread::sleep(delay);
                    if to_server.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
        }
    });
    format!("https://{address}")
}

/// A kubeconfig for `user` whose every request goes through [`slow_link`] with `delay`, written
/// into the control plane's directory as `<name>.kubeconfig`.
pub fn slow_kubeconfig(cp: &ControlPlane, user: &str, name: &str, delay: Duration) -> PathBuf {
    let server = cp.server().to_string();
    let kubeconfig = std::fs::read_to_string(cp.kubeconfig(user)).expect("kubeconfig");
    let path = cp.dir().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, kubeconfig.replace(&server, &slow_link(&server, delay))).expect("write kubeconfig");
    path
}
