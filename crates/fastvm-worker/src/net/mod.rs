//! Per-VM networking: a network namespace per VM, a veth pair to the host, a
//! tap for QEMU, nftables for the firewall and an in-process DNS resolver.
//!
//! ```text
//!   host netns                          VM netns fvm-<slot>                   guest
//!  ┌──────────────────────────┐       ┌──────────────────────────────┐      ┌─────────┐
//!  │ eth0 (uplink)            │       │ veth0 B+6 / C+6              │      │ eth0    │
//!  │  nft ip fastvm_nat_*:    │ veth  │   default via B+5 / C+5      │ tap0 │ B+2/30  │
//!  │  masquerade pool -> out  ├───────┤ nft inet fastvm: firewall    ├──────┤ C+2/126 │
//!  │ fvh-<slot> B+5 / C+5     │ pair  │ tap0 B+1 / C+1 (gateway)     │ QEMU │ (public │
//!  │  route B/30, C/126 via   │       │ resolver B+1:53 (udp+tcp,    │      │  IPv6)  │
//!  │  B+6 / C+6               │       │   sockets owned by the worker)│     └─────────┘
//!  └──────────────────────────┘       └──────────────────────────────┘
//! ```
//!
//! QEMU is started inside the namespace (`setns` in its `pre_exec`) and opens
//! `tap0` there (`-netdev tap,ifname=tap0`). Every VM has the same device, so
//! a golden snapshot restores into any VM; the agent then sets the MAC, the
//! addresses, routes and `/etc/resolv.conf` ([`VmNet::guest_config`]).
//! Addresses follow from a slot number (see [`addr`]); a slot is taken by
//! creating its namespace (`ip netns add` fails when it exists, so runtimes
//! sharing a host never collide) and recorded in the VM's `net.json`, plus an
//! owner file `/run/fastvm/net/<netns>` naming the data dir, so a runtime
//! removes at start the namespaces of its own VMs that are gone, and those of
//! data dirs that no longer exist.
//!
//! Below the firewall, the [`guard`] (its own tables, in the VM namespace and
//! on the host) keeps every guest off the host, link-local/metadata
//! addresses, other VMs and the operator's internal ranges, and drops frames
//! with a source MAC or address not the VM's own.

pub mod addr;
pub mod dns;
pub mod guard;
pub mod netns;
pub mod nft;

use crate::error::{Error, Result};
use addr::{Addressing, NS_VETH, TAP};
use fastvm_agent_proto::NetworkConfig;
use fastvm_types::FirewallPolicy;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Directory of the owner files of our namespaces.
pub const OWNER_DIR: &str = "/run/fastvm/net";

/// Operator settings of VM networking.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// IPv4 pool; each VM takes a /29 of it (default 10.200.0.0/16).
    pub ipv4_pool: Ipv4Net,
    /// Prefix routed to this host; each VM's `publicIpv6` comes from it
    /// (default the ULA fd00:fa57::/64, so one host works out of the box).
    pub ipv6_prefix: Ipv6Net,
    /// Where the resolvers forward allowed queries (default: the first
    /// nameserver of the host's /etc/resolv.conf).
    pub dns_upstream: SocketAddr,
    /// Addresses dropped under `blockBypass` besides [`nft::KNOWN_DOH`].
    pub extra_doh: Vec<IpNet>,
    /// What guests may never reach, whatever their firewall (see [`guard`]).
    pub guard: guard::GuardConfig,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            ipv4_pool: Ipv4Net::new(std::net::Ipv4Addr::new(10, 200, 0, 0), 16).unwrap_or_default(),
            ipv6_prefix: Ipv6Net::new(
                std::net::Ipv6Addr::new(0xfd00, 0xfa57, 0, 0, 0, 0, 0, 0),
                64,
            )
            .unwrap_or_default(),
            dns_upstream: host_nameserver().unwrap_or_else(|| SocketAddr::from(([1, 1, 1, 1], 53))),
            extra_doh: Vec::new(),
            guard: guard::GuardConfig::default(),
        }
    }
}

/// The first `nameserver` of /etc/resolv.conf.
fn host_nameserver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines().find_map(|l| {
        let ip = l.trim().strip_prefix("nameserver")?.trim().parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

/// `net.json` of a VM directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetRecord {
    pub addressing: Addressing,
    pub policy: FirewallPolicy,
}

/// One VM's network.
pub struct VmNet {
    pub addr: Addressing,
    policy: Mutex<FirewallPolicy>,
    resolver: Mutex<Option<Arc<dns::Resolver>>>,
    /// Serialises ruleset loads.
    nft_lock: tokio::sync::Mutex<()>,
}

impl VmNet {
    /// The network part of the guest configuration.
    pub fn guest_config(&self) -> NetworkConfig {
        let a = &self.addr;
        NetworkConfig {
            mac: a.mac.clone(),
            ipv4: format!("{}/30", a.guest4),
            gateway4: a.gateway4.to_string(),
            ipv6: Some(format!("{}/126", a.guest6)),
            gateway6: Some(a.gateway6.to_string()),
            dns: vec![a.gateway4.to_string()],
        }
    }

    pub fn policy(&self) -> FirewallPolicy {
        self.policy.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub fn record(&self) -> NetRecord {
        NetRecord {
            addressing: self.addr.clone(),
            policy: self.policy(),
        }
    }

    fn resolver(&self) -> Option<Arc<dns::Resolver>> {
        self.resolver.lock().ok().and_then(|r| r.clone())
    }
}

/// The networking of one runtime (data dir).
pub struct Network {
    cfg: NetConfig,
    owner: PathBuf,
}

/// Serialises slot allocation among the runtimes of this process.
static ALLOC: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn owner_file(netns: &str) -> PathBuf {
    Path::new(OWNER_DIR).join(netns)
}

impl Network {
    /// Prepare the host: forwarding on, NAT for the pool, the host guard.
    pub async fn open(cfg: NetConfig, data_dir: &Path) -> Result<Network> {
        if addr::slots(cfg.ipv4_pool) == 0 {
            return Err(Error::Network(format!(
                "IPv4 pool {} is too small (need at least a /29)",
                cfg.ipv4_pool
            )));
        }
        if cfg.ipv6_prefix.prefix_len() > 96 {
            return Err(Error::Network(format!(
                "IPv6 prefix {} is too small (need at least a /96)",
                cfg.ipv6_prefix
            )));
        }
        for (path, value) in [
            ("/proc/sys/net/ipv4/ip_forward", "1"),
            ("/proc/sys/net/ipv6/conf/all/forwarding", "1"),
        ] {
            std::fs::write(path, value)
                .map_err(|e| Error::Network(format!("enable forwarding ({path}): {e}")))?;
        }
        let pool = cfg.ipv4_pool.trunc();
        let table = format!("fastvm_nat_{}", pool.to_string().replace(['.', '/'], "_"));
        let script = format!(
            "table ip {table} {{}}\ndelete table ip {table}\ntable ip {table} {{\n  chain postrouting {{\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {pool} oifname != \"{}*\" masquerade\n  }}\n}}\n",
            addr::HOST_VETH_PREFIX
        );
        netns::nft(None, &script).await?;
        netns::nft(None, &guard::render_host(&cfg.guard.exceptions)).await?;
        std::fs::create_dir_all(OWNER_DIR)
            .map_err(|e| Error::Network(format!("create {OWNER_DIR}: {e}")))?;
        let owner = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        Ok(Network { cfg, owner })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Take a free slot (by creating its namespace), wire it up, load the
    /// firewall and start the resolver. Everything is undone on failure.
    pub async fn create(&self, vm_id: &str, policy: &FirewallPolicy) -> Result<Arc<VmNet>> {
        let net = self.prepare(vm_id, policy).await?;
        match self.finish(&net).await {
            Ok(()) => Ok(net),
            Err(e) => {
                self.destroy(&net).await;
                Err(e)
            }
        }
    }

    /// What QEMU needs before it starts: a slot (its namespace, hence the
    /// addresses and the MAC) with the tap device in it. Undone on failure.
    /// The guest must not run before [`Network::finish`] has succeeded.
    pub async fn prepare(&self, vm_id: &str, policy: &FirewallPolicy) -> Result<Arc<VmNet>> {
        let t0 = std::time::Instant::now();
        let slot = self.allocate(vm_id).await?;
        tracing::debug!(
            slot,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "net phase: namespace and tap"
        );
        let a = Addressing::new(slot, vm_id, self.cfg.ipv4_pool, self.cfg.ipv6_prefix);
        Ok(Arc::new(VmNet {
            addr: a,
            policy: Mutex::new(policy.clone()),
            resolver: Mutex::new(None),
            nft_lock: Default::default(),
        }))
    }

    /// The rest of a prepared network: veth pair, addresses, routes, the
    /// firewall ruleset and the resolver. May run while QEMU (already
    /// attached to the tap) loads its state, but must succeed before the
    /// guest runs. On failure the caller undoes it with [`Network::destroy`].
    pub async fn finish(&self, net: &Arc<VmNet>) -> Result<()> {
        self.wire(net).await
    }

    async fn allocate(&self, vm_id: &str) -> Result<u32> {
        let _g = ALLOC.lock().await;
        let taken: HashSet<String> = std::fs::read_dir(netns::NETNS_DIR)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        for slot in 0..addr::slots(self.cfg.ipv4_pool) {
            let name = addr::netns_name(slot);
            if taken.contains(&name) {
                continue;
            }
            // Fails when another process took the slot meanwhile: try the next.
            // Forwarding is per namespace; set before the interfaces exist so
            // they inherit it (direct writes on the thread that created it).
            // The tap QEMU opens is created there too (no `ip` process).
            let created = netns::add(&name, || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0")?;
                netns::create_tap(TAP)
            })
            .await?;
            if created {
                let owner = format!("{}\n{vm_id}\n", self.owner.display());
                if let Err(e) = std::fs::write(owner_file(&name), owner) {
                    netns::del(&name);
                    return Err(Error::Network(format!("write owner of {name}: {e}")));
                }
                return Ok(slot);
            }
        }
        Err(Error::Network(format!(
            "no free network slot in {}",
            self.cfg.ipv4_pool
        )))
    }

    /// Two `ip -batch` processes (host side, then namespace side; the tap
    /// exists already, see [`Network::prepare`]) while the ruleset loads
    /// (`nft`, in parallel: it names interfaces, it does not need them), then
    /// the resolver (its address must exist).
    async fn wire(&self, net: &Arc<VmNet>) -> Result<()> {
        let a = &net.addr;
        let ns = a.netns.as_str();
        let t = std::time::Instant::now();
        let phase = |name: &str| {
            tracing::debug!(
                netns = ns,
                ms = t.elapsed().as_secs_f64() * 1e3,
                "net phase: {name}"
            )
        };
        // The peer moves into the namespace at creation; the host side is
        // up before the namespace side, so veth0 has its carrier when the
        // default routes are added.
        let host = format!(
            "link add {hv} type veth peer name {NS_VETH} netns {ns}\n\
             addr add {}/30 dev {hv}\naddr add {}/126 dev {hv} nodad\nlink set {hv} up\n\
             route add {} via {} dev {hv}\nroute add {} via {} dev {hv}\n",
            a.host_veth4,
            a.host_veth6,
            a.guest_net4(),
            a.ns_veth4,
            a.guest_net6(),
            a.ns_veth6,
            hv = a.host_veth
        );
        let inside = format!(
            "link set lo up\naddr add {}/30 dev {NS_VETH}\naddr add {}/126 dev {NS_VETH} nodad\nlink set {NS_VETH} up\n\
             addr add {}/30 dev {TAP}\naddr add {}/126 dev {TAP} nodad\nlink set {TAP} up\n\
             route add default via {}\nroute add default via {}\n",
            a.ns_veth4, a.ns_veth6, a.gateway4, a.gateway6, a.host_veth4, a.host_veth6
        );
        let links = async {
            netns::ip_batch(None, &host).await?;
            phase("host batch");
            netns::ip_batch(Some(ns), &inside).await?;
            phase("netns batch");
            Ok::<(), Error>(())
        };
        let rules = async {
            self.load_rules(net).await?;
            phase("nft");
            Ok::<(), Error>(())
        };
        tokio::try_join!(links, rules)?;
        self.start_resolver(net).await?;
        phase("resolver");
        Ok(())
    }

    async fn start_resolver(&self, net: &VmNet) -> Result<()> {
        let r = dns::Resolver::start(
            &net.addr.netns,
            net.addr.gateway4,
            self.cfg.dns_upstream,
            &net.policy(),
        )
        .await?;
        if let Ok(mut slot) = net.resolver.lock() {
            if let Some(old) = slot.replace(r) {
                old.stop();
            }
        }
        Ok(())
    }

    async fn load_rules(&self, net: &VmNet) -> Result<()> {
        self.load_rules_with(net, Vec::new()).await
    }

    /// Load the ruleset with the resolver's remembered answers and `carried`
    /// elements in the fqdn sets.
    async fn load_rules_with(&self, net: &VmNet, carried: Vec<nft::SetElement>) -> Result<()> {
        let _g = net.nft_lock.lock().await;
        let policy = net.policy();
        let mut known = net
            .resolver()
            .map(|r| r.known_elements(&policy))
            .unwrap_or_default();
        known.extend(carried);
        // The guard and the user ruleset in one transaction: the guard is
        // never missing, not even while a policy is replaced.
        let mut script = guard::render_vm(
            &net.addr,
            &self.cfg.guard,
            self.cfg.ipv4_pool,
            self.cfg.ipv6_prefix,
        );
        script.push_str(&nft::render(&policy, &known, &self.cfg.extra_doh));
        netns::nft(Some(&net.addr.netns), &script).await
    }

    /// Apply a new (validated) policy to a live VM: ruleset and dns gate.
    pub async fn set_policy(&self, net: &VmNet, policy: &FirewallPolicy) -> Result<()> {
        if let Ok(mut p) = net.policy.lock() {
            *p = policy.clone();
        }
        if let Some(r) = net.resolver() {
            r.set_policy(policy);
        }
        self.load_rules(net).await
    }

    /// Take over the network of a VM found on disk: its namespace must still
    /// exist; the ruleset is reloaded and a new resolver started.
    pub async fn adopt(&self, rec: NetRecord) -> Result<Arc<VmNet>> {
        if !netns::netns_path(&rec.addressing.netns).exists() {
            return Err(Error::Network(format!(
                "namespace {} is gone",
                rec.addressing.netns
            )));
        }
        let net = Arc::new(VmNet {
            addr: rec.addressing,
            policy: Mutex::new(rec.policy),
            resolver: Mutex::new(None),
            nft_lock: Default::default(),
        });
        // The VM keeps its network (and is torn down on delete) even when
        // these fail, e.g. while another runtime still serves its resolver.
        // The fqdn sets keep what the previous worker's resolver put there
        // (with the time left), so the guest needs no new lookup.
        let carried = match netns::output(
            Some(&net.addr.netns),
            "nft",
            &["-j", "list", "sets", "inet"],
        )
        .await
        {
            Ok(json) => nft::loaded_set_elements(&json),
            Err(e) => {
                tracing::debug!(netns = %net.addr.netns, error = %e, "no loaded sets to carry over");
                Vec::new()
            }
        };
        if let Err(e) = self.load_rules_with(&net, carried).await {
            tracing::warn!(netns = %net.addr.netns, error = %e, "reloading the firewall failed");
        }
        if let Err(e) = self.start_resolver(&net).await {
            tracing::warn!(netns = %net.addr.netns, error = %e, "restarting the resolver failed");
        }
        Ok(net)
    }

    /// Tear a VM's network down: resolver, host veth (and with it the routes
    /// and the pair), namespace (and with it the tap and the ruleset).
    pub async fn destroy(&self, net: &VmNet) {
        if let Some(r) = net.resolver.lock().ok().and_then(|mut r| r.take()) {
            r.stop();
        }
        remove_slot(&net.addr.netns, &net.addr.host_veth).await;
    }

    /// Remove the namespaces this data dir owns that no VM in `keep` uses,
    /// and those of data dirs that no longer exist.
    pub async fn cleanup_orphans(&self, keep: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(OWNER_DIR) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(slot) = addr::parse_slot(&name) else {
                continue;
            };
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            let dir = owner.lines().next().unwrap_or("");
            let ours = Path::new(dir) == self.owner;
            let orphan =
                (ours && !keep.contains(&name)) || (!dir.is_empty() && !Path::new(dir).exists());
            if orphan {
                tracing::info!(netns = %name, owner = dir, "removing left-over VM network");
                remove_slot(&name, &format!("{}{slot:04x}", addr::HOST_VETH_PREFIX)).await;
            }
        }
    }
}

async fn remove_slot(netns_name: &str, host_veth: &str) {
    // Explicitly, although the pair dies with the namespace: that happens
    // asynchronously in the kernel, and the slot may be taken again at once.
    let _ = netns::run(None, "ip", &["link", "del", host_veth], "").await;
    netns::del(netns_name);
    let _ = std::fs::remove_file(owner_file(netns_name));
}

/// Remove (synchronously) every namespace owned by `data_dir`: for test
/// harnesses at exit, when no runtime is left to do it.
pub fn remove_owned_by(data_dir: &Path) {
    let owner = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir(OWNER_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let Some(slot) = addr::parse_slot(&name) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if Path::new(text.lines().next().unwrap_or("")) != owner {
            continue;
        }
        let quiet = |args: &[&str]| {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        };
        quiet(&[
            "link",
            "del",
            &format!("{}{slot:04x}", addr::HOST_VETH_PREFIX),
        ]);
        quiet(&["netns", "del", &name]);
        let _ = std::fs::remove_file(e.path());
    }
}
