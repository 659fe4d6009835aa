// A real S3 server on loopback: Debian 12's Ceph RGW on a throwaway one-mon, one-OSD cluster in a
// temp dir. Unlike s3rver it checks signatures, refuses parts under 5 MiB and bad Content-MD5,
// and lists any number of keys, as R2 does. Everything it writes (config, mon and OSD data, logs,
// sockets) is under the temp dir; nothing in /etc/ceph or /var/lib/ceph is read or written.
// Needs the Debian packages radosgw, ceph-mon and ceph-osd (test/run.mjs installs them).
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

// Throwaway keys of the test user, known so a test can also sign with a wrong one.
const RGW_ACCESS_KEY_ID = 'RGWTESTACCESSKEY0001';
const RGW_SECRET_ACCESS_KEY = 'rgw-test-secret-of-a-throwaway-cluster-0';

export interface RgwOptions {
  /** Bound of the whole boot; a boot that takes longer fails with the logs' last lines. */
  timeoutMs?: number;
  /**
   * The OSD's object store. memstore (RAM) boots in 2-3 s but keeps ~40 KiB of RAM per object
   * (20,000 tiny objects: an 850 MiB OSD); bluestore boots in 5-7 s and keeps the data in a sparse
   * file in the temp dir, its RAM bounded (200,000 objects: 1.3 GiB OSD, 2.8 GB of disk).
   */
  store?: 'memstore' | 'bluestore';
  /** memstore: the data it may hold (its RAM use is more); bluestore: the size of its block file. */
  storeBytes?: number;
}

export interface Rgw {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** A client of the test user, checksums only when required (as R2Backend's). */
  client: S3Client;
  /** The temp dir that holds the cluster. */
  dir: string;
  /** Pids of ceph-mon, ceph-osd and radosgw, by name. */
  pids: Record<string, number>;
  createBucket(name: string): Promise<void>;
  /** Kills the daemons and removes the temp dir. */
  stop(): Promise<void>;
}

/** A port free on 127.0.0.1 now (the kernel's pick). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Clusters not stopped yet: killed, their dirs removed, when this process exits or is stopped. */
const running = new Set<() => void>();
function cleanUpAll() {
  for (const cleanUp of running) cleanUp();
  running.clear();
}
process.on('exit', cleanUpAll);
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  // A test run stopped by its timeout (SIGTERM) leaves no cluster dir; then dies of the signal.
  process.once(signal, () => {
    cleanUpAll();
    process.kill(process.pid, signal);
  });
}

/** The last `n` lines of a file, or '' when it cannot be read. */
function tail(file: string, n: number): string {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '';
  }
}

interface ConfParams {
  dir: string;
  fsid: string;
  monPort: number;
  rgwPort: number;
  store: string;
  storeBytes: number;
}

function confText({ dir, fsid, monPort, rgwPort, store, storeBytes }: ConfParams): string {
  return `[global]
fsid = ${fsid}
mon host = v2:127.0.0.1:${monPort}
public addr = 127.0.0.1
ms bind ipv6 = false
# cephx between the daemons adds nothing here; S3 signatures are checked by RGW all the same.
auth cluster required = none
auth service required = none
auth client required = none
# radosgw asks for a "secure" mon connection by default, which only cephx gives.
ms mon client mode = crc
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
pid file = ${dir}/run/$name.pid
log file = ${dir}/log/$name.log
crash dir = ${dir}/crash
log to stderr = false
err to stderr = true
# One OSD: pools of one replica, few PGs, nothing to balance.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
# Each pool RGW creates is a map change: propose at once, not every second.
paxos propose interval = 0.1
ms async op threads = 2

[client]
# radosgw-admin starts while the OSD boots: its first requests wait for a map with the OSD up,
# which it asks for on its tick (5 s by default).
objecter tick interval = 0.5

[mon]
mon data = ${dir}/mon
mon data avail warn = 1
mon data avail crit = 0
mon cluster log file = ${dir}/log/cluster.log

[osd]
osd data = ${dir}/osd
osd objectstore = ${store}
memstore device bytes = ${storeBytes}
# An object's bytes in a buffer of their size, not in 64 KiB pages.
memstore page set = false
bluestore block path = ${dir}/osd-block
bluestore block size = ${storeBytes}
bluestore block create = true
bluestore fsck on mkfs = false
bluestore block db create = false
bluestore block wal create = false
osd memory target = 536870912
bluestore cache autotune = false
bluestore cache size = 67108864
osd op num shards = 2
osd op num threads per shard = 1
osd class load list = *
osd class default list = *

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:${rgwPort}
rgw thread pool size = 16
# The SDK in region "auto" (R2's) sends that as the bucket's location constraint; R2 takes it.
rgw relaxed region enforcement = true
# No background work: garbage collection and lifecycle only add load to a throwaway cluster.
rgw enable gc threads = false
rgw enable lc threads = false
rgw enable quota threads = false
`;
}

/** Starts a throwaway Ceph cluster and RGW; fails within `timeoutMs`, saying why. */
export async function startRgw(opts: RgwOptions = {}): Promise<Rgw> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const store = opts.store ?? 'memstore';
  const storeBytes = opts.storeBytes ?? (store === 'memstore' ? 2 : 20) * 1024 ** 3;
  const deadline = Date.now() + timeoutMs;
  const left = () => Math.max(1, deadline - Date.now());
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-rgw-'));
  for (const d of ['mon', 'osd', 'run', 'log', 'crash']) fs.mkdirSync(path.join(dir, d));
  const [monPort, rgwPort] = [await freePort(), await freePort()];
  const conf = path.join(dir, 'ceph.conf');
  const fsid = crypto.randomUUID();
  fs.writeFileSync(conf, confText({ dir, fsid, monPort, rgwPort, store, storeBytes }));
  // Every ceph tool reads CEPH_CONF; the cluster name stays "ceph", its paths all in `dir`.
  const env = { ...process.env, CEPH_CONF: conf };
  const logs = path.join(dir, 'log');
  const daemons: { name: string; child: ChildProcess; log: string }[] = [];
  const pids: Record<string, number> = {};
  let failure: string | undefined;

  const kill = () => {
    for (const d of daemons) if (d.child.exitCode === null && d.child.signalCode === null) d.child.kill('SIGKILL');
  };
  const cleanUp = () => {
    kill();
    // The killed daemons may still be closing files: retry a dir that is not empty yet.
    fs.rmSync(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 50 });
  };
  // A test process that ends without stop() still takes its daemons and dir along (setpriv's
  // pdeathsig covers a process killed outright, but leaves the dir).
  running.add(cleanUp);

  // A daemon that dies during the boot fails the boot at once, not at the deadline.
  const tools = new AbortController();
  let died: (why: string) => void = () => {};
  const death = new Promise<never>((_, reject) => {
    died = (why) => {
      reject(new Error(why));
      tools.abort();
    };
  });
  death.catch(() => {});

  /** A one-shot tool, bounded by the boot's deadline; fails with its last lines of stderr. */
  const run = (cmd: string, args: string[]) =>
    Promise.race([
      death,
      new Promise<string>((resolve, reject) => {
        const bounds = { env, timeout: left(), killSignal: 'SIGKILL' as const, signal: tools.signal };
        execFile(cmd, args, bounds, (e, stdout, stderr) => {
          const said = stderr.trimEnd().split('\n').slice(-8).join('\n');
          const late = e?.killed && !tools.signal.aborted;
          const how = late ? `not done at the boot's deadline` : e?.message.split('\n')[0];
          if (e) reject(new Error(`${cmd} ${args[0]}: ${how}\n${said}`.trim()));
          else resolve(stdout);
        });
      }),
    ]);

  /** A daemon in the foreground, killed with this process (pdeathsig), its output in a file. */
  const daemon = (name: string, cmd: string, args: string[], log: string) => {
    const out = fs.openSync(path.join(logs, `${name}.out`), 'a');
    const child = spawn('setpriv', ['--pdeathsig', 'KILL', '--', cmd, ...args, '-f'], {
      env,
      stdio: ['ignore', out, out],
    });
    fs.closeSync(out);
    // A test that forgets stop() still ends; its exit kills the daemons.
    child.unref();
    child.on('exit', (code, signal) => {
      failure ??= `${name} exited (${signal ?? `code ${code}`})`;
      died(failure);
    });
    daemons.push({ name, child, log: path.join(logs, log) });
    pids[name] = child.pid!;
    return child;
  };

  const explain = (why: string) => {
    const lines = daemons
      .map((d) => {
        const logTail = tail(d.log, 8);
        const outTail = tail(path.join(logs, `${d.name}.out`), 8);
        return `--- ${d.name}\n${[outTail, logTail].filter(Boolean).join('\n')}`;
      })
      .join('\n');
    return new Error(`RGW did not start: ${why}\n${lines}`);
  };

  const stop = async () => {
    running.delete(cleanUp);
    kill();
    // SIGKILL: a throwaway cluster needs no clean shutdown (memstore would write its RAM out).
    await Promise.all(
      daemons.map((d) =>
        d.child.exitCode !== null || d.child.signalCode !== null
          ? undefined
          : new Promise<void>((r) => {
              d.child.once('exit', () => r());
              setTimeout(r, 5_000);
            }),
      ),
    );
    fs.rmSync(dir, { recursive: true, force: true });
  };

  try {
    // The monmap names mon "a" at its port: built from `mon host` alone, it would not know itself.
    const monmap = path.join(dir, 'monmap');
    await run('monmaptool', ['--create', '--fsid', fsid, '--addv', 'a', `[v2:127.0.0.1:${monPort}]`, monmap]);
    await run('ceph-mon', ['--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', '/dev/null']);
    daemon('mon', 'ceph-mon', ['-i', 'a'], 'mon.a.log');
    const osdUuid = crypto.randomUUID();
    // The OSD's id in the map; the CLI waits for the mon to form its quorum of one.
    const wait = String(Math.ceil(left() / 1000));
    const id = (await run('ceph', ['--connect-timeout', wait, 'osd', 'new', osdUuid])).trim();
    if (!/^\d+$/.test(id)) throw new Error(`ceph osd new said ${JSON.stringify(id)}`);
    await run('ceph-osd', ['--mkfs', '-i', id, '--osd-uuid', osdUuid]);
    daemon('osd', 'ceph-osd', ['-i', id], `osd.${id}.log`);
    // Creates RGW's pools (so waits for the OSD to be up) and the user. The secret is a test key.
    await run('radosgw-admin', [
      'user',
      'create',
      '--uid',
      'test',
      '--display-name',
      'test',
      '--access-key',
      RGW_ACCESS_KEY_ID,
      '--secret',
      RGW_SECRET_ACCESS_KEY,
    ]);
    daemon('rgw', 'radosgw', ['-n', 'client.rgw'], 'client.rgw.log');
    const endpoint = `http://127.0.0.1:${rgwPort}`;
    while (!(await answers(endpoint))) {
      if (failure) throw new Error(failure);
      if (Date.now() >= deadline) throw new Error(`no answer on ${endpoint} after ${timeoutMs} ms`);
      await sleep(100);
    }
    const client = new S3Client({
      endpoint,
      region: 'auto',
      forcePathStyle: true,
      credentials: { accessKeyId: RGW_ACCESS_KEY_ID, secretAccessKey: RGW_SECRET_ACCESS_KEY },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    return {
      endpoint,
      accessKeyId: RGW_ACCESS_KEY_ID,
      secretAccessKey: RGW_SECRET_ACCESS_KEY,
      client,
      dir,
      pids,
      async createBucket(name) {
        await client.send(new CreateBucketCommand({ Bucket: name }));
      },
      async stop() {
        client.destroy();
        await stop();
      },
    };
  } catch (e) {
    const err = explain(failure ?? (e as Error).message);
    await stop();
    throw err;
  }
}

/** Whether an HTTP server answers at `url` (any status), within a second. */
function answers(url: string): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: 1_000 }, (res) => {
      res.resume();
      resolve(true);
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(false));
  });
}
