// A live `fastvm serve` booting real QEMU microVMs, for the end-to-end tests; the
// same set-up as sdk/python/tests/e2e/conftest.py:
//
// - the binary is $FASTVM_BIN, else <repo>/target/release/fastvm, else
//   <repo>/target/debug/fastvm;
// - free ports for the API and the services proxy, a fresh data dir, guest images
//   from $FASTVM_TEST_IMAGES (default /var/tmp/fastvm-test-images), guests' DNS
//   upstream 127.0.0.1:9 (nothing: never the host's resolver);
// - without a binary the tests skip, unless FASTVM_E2E=1 (CI), where they fail;
// - teardown deletes every VM through the API, stops the server by its pid
//   (SIGTERM, then SIGKILL) and kills any QEMU still listed in DATA/vms/*/qemu.pid.
//   FASTVM_E2E_KEEP=1 keeps the temp dir (data dir and server.log).
import { spawn } from "node:child_process";
import { chmodSync, closeSync, existsSync, accessSync, constants, openSync, readFileSync, readdirSync, mkdtempSync, mkdirSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../..");
const DEFAULT_IMAGE_DIR = "/var/tmp/fastvm-test-images";
const STARTUP_TIMEOUT_MS = 60_000;

function executable(p) {
  try {
    accessSync(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** The fastvm binary to test, and the paths looked at. */
export function findBinary() {
  if (process.env.FASTVM_BIN) {
    const p = process.env.FASTVM_BIN;
    return { binary: existsSync(p) && executable(p) ? p : undefined, looked: [p] };
  }
  const looked = [path.join(REPO_ROOT, "target/release/fastvm"), path.join(REPO_ROOT, "target/debug/fastvm")];
  return { binary: looked.find((p) => existsSync(p) && executable(p)), looked };
}

/**
 * Why the e2e tests cannot run (no binary), or undefined. Under FASTVM_E2E=1 the
 * caller must fail rather than skip.
 */
export function unavailableReason() {
  const { binary, looked } = findBinary();
  if (binary) return undefined;
  return `no fastvm binary for the end-to-end tests (looked at ${looked.join(", ")}); build it with \`cargo build --release -p fastvm-cli\` or set FASTVM_BIN`;
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function tail(file, lines = 40) {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

function alive(pid) {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return e.code === "EPERM";
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0] !== "Z";
  } catch {
    return false;
  }
}

export class LiveServer {
  constructor(binary) {
    this.binary = binary;
    this.root = mkdtempSync(path.join(os.tmpdir(), "fastvm-ts-e2e-"));
    // mkdtemp makes it 0700; each VM's QEMU runs as its own uid and must traverse it
    // to reach its files under data/ (the server refuses a data dir it cannot reach).
    chmodSync(this.root, 0o711);
    this.dataDir = path.join(this.root, "data");
    this.logPath = path.join(this.root, "server.log");
    this.imageDir = process.env.FASTVM_TEST_IMAGES || DEFAULT_IMAGE_DIR;
    this.port = 0;
    this.proxyPort = 0;
    this.apiKey = "";
    this.process = undefined;
    this.stopped = false;
    mkdirSync(this.dataDir);
    this.onExit = () => this.killNow();
    process.on("exit", this.onExit);
  }

  get baseUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  async start() {
    const env = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !k.startsWith("FASTVM_") || k === "FASTVM_AGENT_BIN"),
    );
    env.RUST_LOG ??= "info";
    env.NO_COLOR = "1";
    let lastError = "";
    for (let attempt = 0; attempt < 3; attempt++) {
      this.port = await freePort();
      this.proxyPort = await freePort();
      const log = openSync(this.logPath, "a");
      const child = spawn(
        this.binary,
        [
          "serve",
          "--data-dir", this.dataDir,
          "--listen", `127.0.0.1:${this.port}`,
          "--proxy-listen", `127.0.0.1:${this.proxyPort}`,
          "--image-dir", this.imageDir,
          // Guests' allowed DNS queries go nowhere: never the host's resolver.
          "--dns-upstream", "127.0.0.1:9",
        ],
        // Own process group: a Ctrl-C on the test run must not stop the server
        // before the teardown has deleted the VMs through the API.
        { stdio: ["ignore", log, log], env, detached: true },
      );
      closeSync(log);
      this.process = child;
      let exited = false;
      child.once("exit", () => (exited = true));
      const deadline = Date.now() + STARTUP_TIMEOUT_MS;
      while (Date.now() < deadline) {
        if (exited) {
          lastError = `fastvm serve exited with ${child.exitCode ?? child.signalCode}`;
          break;
        }
        try {
          const r = await fetch(`${this.baseUrl}/healthz`, { signal: AbortSignal.timeout(2000) });
          if (r.status === 200 && (await r.json()).status === "ok") {
            this.apiKey = readFileSync(path.join(this.dataDir, "admin-api-key"), "utf8").trim();
            return;
          }
        } catch {
          // not up yet
        }
        await sleep(100);
      }
      if (!exited && !lastError) lastError = `/healthz did not answer within ${STARTUP_TIMEOUT_MS / 1000} s`;
      await this.stopProcess();
    }
    throw new Error(`${lastError}; server log ${this.logPath}:\n${tail(this.logPath)}`);
  }

  /** VM id -> pid of the live QEMUs of this data dir. */
  qemuPids() {
    const out = {};
    const vmsDir = path.join(this.dataDir, "vms");
    if (!existsSync(vmsDir)) return out;
    for (const id of readdirSync(vmsDir)) {
      let pid;
      try {
        pid = parseInt(readFileSync(path.join(vmsDir, id, "qemu.pid"), "utf8").trim(), 10);
      } catch {
        continue;
      }
      if (Number.isInteger(pid) && alive(pid) && this.isOurQemu(pid)) out[id] = pid;
    }
    return out;
  }

  /** True when pid is a QEMU of this data dir (guards against pid reuse). */
  isOurQemu(pid) {
    try {
      const cmdline = readFileSync(`/proc/${pid}/cmdline`, "latin1");
      return cmdline.includes("qemu") && cmdline.includes(this.dataDir);
    } catch {
      return false;
    }
  }

  async deleteAllVms() {
    if (!this.apiKey || !this.process || this.process.exitCode !== null) return;
    const headers = { Authorization: `Bearer ${this.apiKey}` };
    try {
      const r = await fetch(`${this.baseUrl}/v1/vms`, { headers, signal: AbortSignal.timeout(30_000) });
      for (const vm of await r.json()) {
        await fetch(`${this.baseUrl}/v1/vms/${vm.id}`, {
          method: "DELETE",
          headers,
          signal: AbortSignal.timeout(30_000),
        }).catch(() => {});
      }
    } catch {
      // the server is gone: the QEMU sweep below still runs
    }
  }

  async stopProcess() {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    try {
      process.kill(child.pid, "SIGTERM");
    } catch {
      return;
    }
    const timedOut = await Promise.race([exited.then(() => false), sleep(15_000).then(() => true)]);
    if (timedOut) {
      try {
        process.kill(child.pid, "SIGKILL");
      } catch {
        // exited meanwhile
      }
      await Promise.race([exited, sleep(10_000)]);
    }
  }

  async killLeftoverQemu() {
    let pids = Object.values(this.qemuPids());
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGTERM");
      } catch {
        // gone
      }
    }
    const deadline = Date.now() + 5000;
    while (pids.length && Date.now() < deadline) {
      pids = pids.filter(alive);
      await sleep(100);
    }
    for (const pid of pids) {
      if (this.isOurQemu(pid)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
      }
    }
  }

  async stop() {
    if (this.stopped) return;
    this.stopped = true;
    try {
      await this.deleteAllVms();
    } finally {
      await this.stopProcess();
      await this.killLeftoverQemu();
      process.off("exit", this.onExit);
      if (process.env.FASTVM_E2E_KEEP !== "1") rmSync(this.root, { recursive: true, force: true });
    }
  }

  /** Last resort at process exit (synchronous): the server and its QEMUs, by pid. */
  killNow() {
    if (this.stopped) return;
    const child = this.process;
    if (child && child.exitCode === null && child.signalCode === null) {
      try {
        process.kill(child.pid, "SIGKILL");
      } catch {
        // gone
      }
    }
    for (const pid of Object.values(this.qemuPids())) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone
      }
    }
  }
}
