//! A TCP proxy the test can cut and restore, standing between the exporter and a database.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub addr: SocketAddr,
    target: String,
    up: Arc<AtomicBool>,
    /// While set, nothing is passed on either way: a server that stopped answering.
    stalled: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream, stalled: Arc<AtomicBool>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while stalled.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let p = Proxy {
            addr,
            target: target.to_string(),
            up: Arc::new(AtomicBool::new(true)),
            stalled: Arc::default(),
            conns: Arc::default(),
        };
        p.serve(listener);
        p
    }

    fn serve(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (up, conns, target) = (self.up.clone(), self.conns.clone(), self.target.clone());
        let stalled = self.stalled.clone();
        std::thread::spawn(move || {
            while up.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(&target) else {
                            continue;
                        };
                        let mut list = conns.lock().unwrap();
                        list.push(client.try_clone().unwrap());
                        list.push(server.try_clone().unwrap());
                        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (st1, st2) = (stalled.clone(), stalled.clone());
                        std::thread::spawn(move || pipe(client, server, st1));
                        std::thread::spawn(move || pipe(s2, c2, st2));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            // Dropping the listener refuses new connections.
        });
    }

    /// Refuses new connections and breaks the open ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Keeps every connection open but passes nothing on: the database stops answering.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::Relaxed);
    }

    /// Accepts connections again on the same address.
    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
        let listener = TcpListener::bind(self.addr).expect("re-binding the proxy's port");
        self.serve(listener);
    }
}
