// What the tests share: a real S3 server (s3rver) on loopback that counts the requests it gets,
// temp trees, and running a script as the admin would, as a child process.
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http, { type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import S3rver from 's3rver';
import { processStart } from '../lib/lock.ts';
import './s3rver-fixes.ts'; // aborting multipart uploads and checking signatures, as R2 does
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
import {
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';

export const ROOT = path.resolve(import.meta.dirname, '..');
export const SECRET = 'S3RVER'; // s3rver's built-in account: key id and secret are both this

export function tempDir(label: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `cms-${label}-`));
}

export interface RequestLog {
  method: string;
  url: string;
}

export interface S3Server {
  endpoint: string;
  port: number;
  dir: string;
  requests: RequestLog[];
  client: S3Client;
  /** Requests that carry an object body: PutObject and UploadPart are the only PUTs the scripts send. */
  bodyRequests(): RequestLog[];
  readObject(bucket: string, key: string): Promise<Buffer>;
  headObject(
    bucket: string,
    key: string,
  ): Promise<{ size: number; etag: string; metadata: Record<string, string> } | undefined>;
  listKeys(bucket: string, prefix?: string): Promise<string[]>;
  /**
   * Stores `body` as the bash scripts' aws-cli did: 8 MiB parts, no sha256 metadata. R2 answers
   * `md5(part md5s)-N` as the ETag of such an object; s3rver keeps a plain MD5, so its stored
   * ETag is set to R2's. Returns that ETag.
   */
  uploadLikeAwsCli(bucket: string, key: string, body: Buffer): Promise<string>;
  /** Multipart uploads begun and neither completed nor aborted. */
  openUploads(bucket: string): string[];
  stop(): Promise<void>;
}

export async function startS3(
  buckets: string[],
  opts: { onRequest?: (r: RequestLog) => void } = {},
): Promise<S3Server> {
  const dir = tempDir('s3');
  const server = new (S3rver as any)({
    port: 0,
    address: '127.0.0.1',
    silent: true,
    directory: dir,
    configureBuckets: buckets.map((name) => ({ name })),
  });
  const { port } = await server.run();
  const requests: RequestLog[] = [];
  server.httpServer.prependListener('request', (req: IncomingMessage) => {
    const r = { method: req.method ?? '', url: req.url ?? '' };
    requests.push(r);
    opts.onRequest?.(r);
  });
  const endpoint = `http://127.0.0.1:${port}`;
  const client = new S3Client({
    endpoint,
    region: 'auto',
    forcePathStyle: true,
    credentials: { accessKeyId: SECRET, secretAccessKey: SECRET },
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
  return {
    endpoint,
    port,
    dir,
    requests,
    client,
    bodyRequests: () => requests.filter((r) => r.method === 'PUT'),
    async readObject(bucket, key) {
      const r = await client.send(new GetObjectCommand({ Bucket: bucket, Key: key }));
      return Buffer.from(await r.Body!.transformToByteArray());
    },
    async headObject(bucket, key) {
      try {
        const h = await client.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
        return { size: h.ContentLength ?? 0, etag: (h.ETag ?? '').replace(/"/g, ''), metadata: h.Metadata ?? {} };
      } catch {
        return undefined;
      }
    },
    async listKeys(bucket, prefix) {
      const keys: string[] = [];
      let token: string | undefined;
      do {
        const page = await client.send(
          new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }),
        );
        keys.push(...(page.Contents ?? []).map((o) => o.Key!));
        token = page.IsTruncated ? page.NextContinuationToken : undefined;
      } while (token);
      return keys.sort();
    },
    async uploadLikeAwsCli(bucket, key, body) {
      const part = 8 * 1024 * 1024;
      const { UploadId } = await client.send(new CreateMultipartUploadCommand({ Bucket: bucket, Key: key }));
      const md5s: Buffer[] = [];
      const parts = [];
      for (let at = 0, n = 1; at < body.length; at += part, n++) {
        const chunk = body.subarray(at, at + part);
        md5s.push(crypto.createHash('md5').update(chunk).digest());
        const p = await client.send(
          new UploadPartCommand({ Bucket: bucket, Key: key, UploadId, PartNumber: n, Body: chunk }),
        );
        parts.push({ PartNumber: n, ETag: p.ETag });
      }
      await client.send(
        new CompleteMultipartUploadCommand({ Bucket: bucket, Key: key, UploadId, MultipartUpload: { Parts: parts } }),
      );
      const etag = `${crypto.createHash('md5').update(Buffer.concat(md5s)).digest('hex')}-${md5s.length}`;
      fs.writeFileSync(path.join(dir, bucket, `${key}._S3rver_object.md5`), etag);
      return etag;
    },
    openUploads(bucket) {
      const uploads = path.join(dir, bucket, '._S3rver_uploads');
      return fs.existsSync(uploads) ? fs.readdirSync(uploads) : [];
    },
    async stop() {
      client.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The environment a script gets in a test: the S3 server's endpoint and credentials, a private state dir. */
export function s3Env(s3: S3Server, stateDir: string): Record<string, string> {
  return {
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: stateDir,
  };
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** How long it ran. */
  ms: number;
}

/** Waits until `check` holds, failing the test after `ms`. */
export async function until(check: () => boolean, ms: number, what: string) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A run's output, for an assertion's message. */
export const out = (r: RunResult) => `--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

export interface RunOptions {
  cwd?: string;
  onSpawn?: (pid: number) => void;
  /** Kill it after this long and reject: a run that does not end by itself is a bug. */
  limitMs?: number;
  /** Run it as this uid and gid (setpriv), for what root would bypass: a permission. */
  asUser?: number;
  /** Directories put first on PATH (stand-in commands). */
  pathFirst?: string[];
}

/**
 * Runs a command (a script of the checkout, by name, or any path) as the admin would, with a
 * clean environment: PATH, HOME and what the test passes; nothing inherited from the machine's
 * AWS settings.
 */
export function runCommand(
  command: string,
  args: string[],
  env: Record<string, string>,
  opts: RunOptions = {},
): Promise<RunResult> {
  const started = Date.now();
  const file = command.includes('/') ? command : path.join(ROOT, command);
  const [cmd, argv] =
    opts.asUser === undefined
      ? [file, args]
      : ['setpriv', [`--reuid=${opts.asUser}`, `--regid=${opts.asUser}`, '--clear-groups', '--', file, ...args]];
  const basePath = process.env.PATH ?? '/usr/bin:/bin';
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, argv, {
      cwd: opts.cwd ?? os.tmpdir(),
      env: { PATH: [...(opts.pathFirst ?? []), basePath].join(':'), HOME: process.env.HOME ?? '/root', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = opts.limitMs ? setTimeout(() => child.kill('SIGKILL'), opts.limitMs) : undefined;
    child.on('error', reject);
    if (child.pid && opts.onSpawn) opts.onSpawn(child.pid);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const ms = Date.now() - started;
      if (opts.limitMs && signal === 'SIGKILL') {
        reject(new Error(`${command} ${args.join(' ')} hung: killed after ${ms} ms\n${stdout}\n${stderr}`));
      } else resolve({ code, signal, stdout, stderr, ms });
    });
  });
}

/** A script of the checkout, run as the admin would (see runCommand). */
export const runScript = (script: string, args: string[], env: Record<string, string>, opts: RunOptions = {}) =>
  runCommand(script, args, env, opts);

/**
 * A lock as a live run of `script` holds it: this test process's pid, host, boot and start time.
 * (A lock whose pid now runs something else is stale: the start time tells pid reuse apart.)
 */
export function writeHeldLock(lockFile: string, script: string) {
  const record = {
    script,
    pid: process.pid,
    host: os.hostname(),
    bootId: fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(),
    procStart: processStart(process.pid),
    started: new Date().toISOString(),
  };
  fs.writeFileSync(lockFile, JSON.stringify(record) + '\n');
}

export function writeTree(root: string, files: Record<string, string | Buffer>) {
  for (const [rel, content] of Object.entries(files)) {
    const file = path.join(root, rel);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, content);
  }
}

/** Every regular file under root, relative path → sha256. */
export function treeDigest(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  const visit = (dir: string, rel: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) visit(path.join(dir, e.name), r);
      else if (e.isFile()) out[r] = sha256(fs.readFileSync(path.join(dir, e.name)));
    }
  };
  visit(root, '');
  return out;
}

/** A loopback port nobody listens on. */
export async function closedPort(): Promise<number> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The hash caches in a state directory, name → sha256 of its bytes: to tell that none changed. */
export function hashCaches(stateDir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of fs
    .readdirSync(stateDir)
    .filter((n) => n.startsWith('hashes-'))
    .sort()) {
    out[name] = sha256(fs.readFileSync(path.join(stateDir, name)));
  }
  return out;
}

export function sha256(data: Buffer | string): string {
  return crypto.createHash('sha256').update(data).digest('hex');
}

/** Random bytes of a given size, written in 1 MiB chunks (never held whole in memory). */
export function writeRandomFile(file: string, size: number) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  const fd = fs.openSync(file, 'w');
  const chunk = 1 << 20;
  for (let done = 0; done < size; done += chunk) fs.writeSync(fd, crypto.randomBytes(Math.min(chunk, size - done)));
  fs.closeSync(fd);
}
