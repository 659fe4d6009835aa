// The S3 server the bench runs against, pluggable: `--server s3rver` (the default) or
// `--server rgw` (Debian's Ceph RGW, test/rgw.ts: a real S3 server, which lists any number of
// keys quickly and does not copy the parts again on CompleteMultipartUpload, as s3rver does), or
// `--server path/to/module.ts`, a module whose `benchServer` export is a ServerKind. The bench
// creates its buckets through the S3 API.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { ROOT, SECRET } from '../test/helpers.ts';

export interface RunningServer {
  /** Plain-http loopback endpoint; the WAN proxy sits in front of it. */
  endpoint: string;
  keys: { accessKeyId: string; secretAccessKey: string };
  stop(): Promise<void>;
}

export interface ServerKind {
  /** For the results' header, e.g. "s3rver 3.7 (one Node process, files on disk)". */
  describe: string;
  start(): Promise<RunningServer>;
}

const s3rver: ServerKind = {
  describe: 's3rver (in its own Node process, objects as files on local disk)',
  async start() {
    const child = spawn(
      process.execPath,
      ['--openssl-legacy-provider', '--import', 'tsx', path.join(ROOT, 'bench/s3-server.mts')],
      {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    const endpoint = await new Promise<string>((resolve, reject) => {
      child.stdout.once('data', (d) => resolve(String(d).trim()));
      child.once('exit', (code) => reject(new Error(`s3rver exited ${code} before it listened`)));
    });
    return {
      endpoint,
      keys: { accessKeyId: SECRET, secretAccessKey: SECRET },
      async stop() {
        if (child.exitCode !== null) return;
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await exited;
      },
    };
  },
};

const rgw: ServerKind = {
  describe: 'Ceph RGW (Debian 12, one mon and one bluestore OSD on loopback)',
  async start() {
    const { startRgw } = await import('../test/rgw.ts');
    const server = await startRgw({ store: 'bluestore', storeBytes: 40 * 1024 ** 3 });
    return {
      endpoint: server.endpoint,
      keys: { accessKeyId: server.accessKeyId, secretAccessKey: server.secretAccessKey },
      stop: () => server.stop(),
    };
  },
};

export async function loadServer(spec: string): Promise<ServerKind> {
  if (spec === 's3rver') return s3rver;
  if (spec === 'rgw') return rgw;
  const mod = (await import(path.resolve(spec))) as { benchServer?: ServerKind };
  if (!mod.benchServer) throw new Error(`${spec} exports no benchServer`);
  return mod.benchServer;
}
