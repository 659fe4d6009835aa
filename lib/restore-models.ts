// Models back onto a restored Verda, downloaded by Verda itself from the models bucket (never
// through Mello). Mello brings restore-verda's bundle over the run's connection (a fresh Verda has
// no scripts installed), runs it with `--models-here` and hands it the models bucket's target and
// credentials on stdin, as the backup's models step does.
//
// Verda downloads every object that is missing or differs: several ranged GETs in flight per
// file, each file written under a temporary name (O_EXCL), its sha256 taken in order as the
// ranges land, checked against the object's `sha256` metadata (or its ETag, for bash-era
// uploads), fsynced and renamed. A file already there with the object's size and sha256 (by the
// hash cache on SFS, which the backup keeps too) is not downloaded. Nothing is ever deleted.
import crypto from 'node:crypto';
import { constants as FS } from 'node:fs';
import fs from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { addNotice, answerRequest, humanSize } from './cli.ts';
import { DEFAULT_LIMITS, type BucketTarget, type Limits } from './config.ts';
import { partialName, removeStalePartials } from './files.ts';
import { TreeCache, etagProvesContent, hashFile, lineMatches, lineOf, type TreeCacheLine } from './hash-cache.ts';
import { Pacer, Slots } from './pacer.ts';
import type { Step } from './plan.ts';
import { pool } from './pool.ts';
import { R2Backend, r2Limits } from './r2.ts';
import type { RestoreSource } from './restore.ts';
import type { Host } from './ssh.ts';
import { StorageError, type Backend, type ObjectInfo } from './storage.ts';
import { printable } from './sync.ts';

export const MODELS_HERE_FLAG = '--models-here';
const MiB = 1024 * 1024;
/** Bytes written to a file between two datasyncs of it (see download). */
const WRITE_BACK = 32 * MiB;

/** What Mello sends on stdin: one JSON line. */
export interface ModelsRestoreRequest {
  target: BucketTarget;
  modelsDir: string;
  hashCacheFile: string;
  dryRun: boolean;
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

export type ModelAction =
  | { action: 'download'; key: string; bytes: number; reason: 'new' | 'changed' }
  | { action: 'in-place'; key: string; bytes: number; how: 'known' | 'metadata' | 'etag' }
  | { action: 'failed'; key: string; bytes: number; error: string };

export interface RestoreTreeResult {
  objects: number;
  bytes: number;
  downloaded: number;
  downloadedBytes: number;
  inPlace: number;
  /** Local files read to learn their sha256 (the hash cache knew the others). */
  hashed: number;
  failures: { key: string; error: string }[];
  actions: ModelAction[];
  /** Set when the hash cache could not be saved (a full disk): a warning. */
  cacheWarning?: string;
}

export interface RestoreTreeOptions {
  root: string;
  backend: Backend;
  /** The models' hash cache (the one backup-verda's models step keeps), read and written in key order. */
  cache: TreeCache;
  dryRun?: boolean;
  signal?: AbortSignal;
  /** Files downloaded at once. */
  files?: number;
  /** Bytes per ranged GET. */
  rangeSize?: number;
  /** Ranged GETs in flight for one file. */
  rangesPerFile?: number;
  /** Ranged GETs in flight in all: what bounds the connections (and memory) of a run. */
  rangesInFlight?: number;
  /** Attempts at one range whose body failed midway (each resumes where it stopped). */
  attempts?: number;
  backoffMs?: number;
  /** A body that gives no byte for this long is abandoned (and resumed). */
  idleTimeoutMs?: number;
  onFile?: (a: ModelAction) => void;
  onBytes?: (n: number) => void;
}

/** An object key as path components under the root, or undefined for one that would leave it. */
function keyParts(key: string): string[] | undefined {
  const parts = key.split('/');
  return parts.some((p) => p === '' || p === '.' || p === '..' || p.includes('\0')) ? undefined : parts;
}

/**
 * The directories of `parts` under root, made where missing; a symlink or a file in the way is
 * an error (never followed out of the root). Directories already seen are not looked at again.
 */
function ensureDirs(root: string, parts: string[], seen: Set<string>): string {
  let dir = root;
  for (const part of parts) {
    dir = path.join(dir, part);
    if (seen.has(dir)) continue;
    try {
      fs.mkdirSync(dir, { mode: 0o755 });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const st = fs.lstatSync(dir);
    if (!st.isDirectory())
      throw new Error(`${dir} is ${st.isSymbolicLink() ? 'a symlink' : 'not a directory'}: not followed`);
    // What a killed run left here (its writer gone) is removed before anything is written.
    removeStalePartials(dir);
    seen.add(dir);
  }
  return dir;
}

/** A body that gives no byte for `ms` is destroyed with an error: a stalled download ends. */
function watchIdle(body: Readable, ms: number, what: string): () => void {
  let timer: NodeJS.Timeout;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => body.destroy(new Error(`${what}: no byte for ${ms / 1000} s`)), ms);
  };
  body.on('data', arm);
  arm();
  return () => clearTimeout(timer);
}

interface Range {
  start: number;
  end: number;
  /** Bytes of it received so far, from its start (a retry resumes after them). */
  received: number;
  /** Bytes of it on disk, from its start. */
  written: number;
  /** Bytes received and not yet hashed: held until the hash reaches this range. */
  held: Buffer[];
}

/** A write to the temporary file failed (disk full): never retried. */
class WriteFailed extends Error {}

/**
 * Downloads `o` into `dest` through a temporary name: ranges in flight at once, each written where
 * it belongs as it arrives, the sha256 taken in order from memory (a range ahead of the hash holds
 * its bytes until the hash reaches it: at most rangesPerFile - 1 ranges a file). Renamed only
 * once the sha256 is the object's (or its ETag proves the bytes), fsynced first.
 */
async function download(
  opts: Required<Pick<RestoreTreeOptions, 'rangeSize' | 'rangesPerFile' | 'attempts' | 'backoffMs' | 'idleTimeoutMs'>> &
    RestoreTreeOptions,
  slots: Slots,
  o: ObjectInfo,
  dest: string,
  wantSha256: string | undefined,
): Promise<string> {
  const { backend, signal } = opts;
  const tmp = partialName(dest);
  const fh = await fs.promises.open(tmp, FS.O_WRONLY | FS.O_CREAT | FS.O_EXCL | FS.O_NOFOLLOW, 0o644);
  const ranges: Range[] = [];
  for (let start = 0; start < o.size; start += opts.rangeSize) {
    ranges.push({ start, end: Math.min(o.size, start + opts.rangeSize), received: 0, written: 0, held: [] });
  }
  // One failure stops the other ranges of this file.
  const stop = new AbortController();
  const onAbort = () => stop.abort(signal!.reason);
  signal?.addEventListener('abort', onAbort, { once: true });
  const pacer = new Pacer({ attempts: opts.attempts, backoffMs: opts.backoffMs });
  // The disk writes while the network still brings bytes: a datasync every WRITE_BACK bytes, one
  // at a time, so that the fsync before the rename finds little left (the kernel alone would
  // start only once gigabytes are dirty, and the whole model would then be written at the end).
  let unsynced = 0;
  let syncing: Promise<void> | undefined;
  let syncError: unknown;
  const writeBack = (bytes: number) => {
    unsynced += bytes;
    if (syncing || unsynced < WRITE_BACK) return;
    unsynced = 0;
    syncing = fh.datasync().then(
      () => void (syncing = undefined),
      (e) => void ((syncError ??= e), (syncing = undefined)),
    );
  };
  const hash = crypto.createHash('sha256');
  let hashed = 0;
  // Hashes what is held at the hash's position, range after range, as far as it goes.
  const advance = () => {
    for (
      let r = ranges[Math.floor(hashed / opts.rangeSize)];
      r?.held.length;
      r = ranges[Math.floor(hashed / opts.rangeSize)]
    ) {
      const chunk = r.held.shift()!;
      hash.update(chunk);
      hashed += chunk.length;
    }
  };

  const fetchRange = (r: Range) =>
    pacer.run(
      'get',
      stop.signal,
      async () => {
        const at = r.start + r.received;
        // The whole object in one GET needs no range (and no Range header).
        const whole = at === 0 && r.end === o.size;
        const body = await backend.get(o.key, stop.signal, whole ? undefined : { start: at, end: r.end });
        const quiet = watchIdle(body, opts.idleTimeoutMs, `${o.key} bytes ${at}-${r.end - 1}`);
        const destroy = () => body.destroy(stop.signal.reason);
        stop.signal.addEventListener('abort', destroy, { once: true });
        // Written in pieces of a MiB or more, one at a time (one system call for many socket
        // reads); the body is paused while a full piece waits for its write.
        let batch: Buffer[] = [];
        let batchBytes = 0;
        let writing: Promise<void> | undefined;
        const flush = async () => {
          const pieces = batch;
          const bytes = batchBytes;
          batch = [];
          batchBytes = 0;
          const pos = r.start + r.written;
          const { bytesWritten } = await fh.writev(pieces, pos).catch((e) => {
            throw new WriteFailed(`${tmp}: ${(e as NodeJS.ErrnoException).code ?? e}`);
          });
          if (bytesWritten !== bytes) throw new WriteFailed(`${tmp}: short write at ${pos}`);
          r.written += bytes;
          writeBack(bytes);
        };
        try {
          await new Promise<void>((resolve, reject) => {
            let ended = false;
            let failed = false;
            const fail = (e: unknown) => {
              if (failed) return;
              failed = true;
              reject(e);
            };
            const pump = () => {
              if (writing || failed) return;
              if (batchBytes >= MiB || (ended && batchBytes > 0)) {
                writing = flush().then(() => {
                  writing = undefined;
                  if (!ended) body.resume();
                  pump();
                }, fail);
              } else if (ended) {
                if (r.start + r.received < r.end)
                  fail(new Error(`${o.key}: the body ended at ${r.start + r.received} of ${r.end}`));
                else resolve();
              }
            };
            // Events, not an async iterator: a promise less for each socket read.
            body.on('data', (chunk: Buffer) => {
              if (failed) return;
              if (r.start + r.received + chunk.length > r.end) {
                return fail(new StorageError(`${o.key}: more bytes than asked (the object changed?)`, false));
              }
              r.received += chunk.length;
              r.held.push(chunk);
              advance();
              batch.push(chunk);
              batchBytes += chunk.length;
              opts.onBytes?.(chunk.length);
              if (batchBytes >= MiB) {
                body.pause();
                pump();
              }
            });
            body.on('end', () => {
              ended = true;
              pump();
            });
            body.on('error', fail);
            body.on('close', () => ended || fail(new Error(`${o.key}: the connection closed midway`)));
          });
        } finally {
          quiet();
          stop.signal.removeEventListener('abort', destroy);
          body.destroy();
          // What was received is on disk before a retry resumes after it.
          await writing?.catch(() => {});
          if (batchBytes) await flush();
        }
      },
      // The backend retried the request itself; what fails here is a body cut midway: resumed.
      (e) => (e instanceof StorageError || e instanceof WriteFailed ? 'fail' : 'backoff'),
      (e) => e,
    );

  try {
    await pool(ranges, opts.rangesPerFile, (r) =>
      slots
        .run(() => fetchRange(r))
        .catch((e) => {
          stop.abort(e);
          throw e;
        }),
    );
    advance();
    if (hashed !== o.size) throw new Error(`${o.key}: ${hashed} bytes hashed of ${o.size}`);
    const sha256 = hash.digest('hex');
    if (wantSha256 ? sha256 !== wantSha256 : !(await etagProvesContent(tmp, o.size, o.etag, signal))) {
      throw new Error(
        `the bytes downloaded are not the object's (${wantSha256 ? 'sha256' : 'ETag'} differs): not restored`,
      );
    }
    await syncing;
    if (syncError) throw new WriteFailed(`${tmp}: ${(syncError as NodeJS.ErrnoException).code ?? syncError}`);
    await fh.sync();
    await fh.close();
    await fs.promises.rename(tmp, dest);
    return sha256;
  } catch (e) {
    stop.abort(e);
    await syncing;
    await fh.close().catch(() => {});
    await fs.promises.rm(tmp, { force: true });
    throw signal?.aborted ? signal.reason : e;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** Every object of the bucket into `root`, where missing or different. Never deletes. */
export async function restoreTree(options: RestoreTreeOptions): Promise<RestoreTreeResult> {
  const opts = {
    // A lone big model gets 8 streams (R2 gives each connection a share, not the whole link); 16
    // in all bound the connections, and the bytes held ahead of the hash (16 × 8 MiB at most).
    files: 4,
    rangeSize: 8 * MiB,
    rangesPerFile: 8,
    rangesInFlight: 16,
    attempts: DEFAULT_LIMITS.r2Attempts,
    backoffMs: DEFAULT_LIMITS.r2BackoffMs,
    idleTimeoutMs: DEFAULT_LIMITS.r2IdleTimeoutMs,
    ...options,
  };
  const { backend, cache, signal, root } = opts;
  const objects: ObjectInfo[] = [];
  for await (const o of backend.list('', signal)) if (!o.key.endsWith('/')) objects.push(o);
  const result: RestoreTreeResult = {
    objects: objects.length,
    bytes: objects.reduce((n, o) => n + o.size, 0),
    downloaded: 0,
    downloadedBytes: 0,
    inPlace: 0,
    hashed: 0,
    failures: [],
    actions: [],
  };
  const report = (a: ModelAction) => {
    result.actions.push(a);
    opts.onFile?.(a);
  };
  const slots = new Slots(opts.rangesInFlight);
  const dirs = new Set<string>();
  if (!opts.dryRun) fs.mkdirSync(root, { recursive: true });

  /** The object's sha256: remembered with its ETag, else its metadata; undefined for a bash-era upload. */
  const objectSha = async (
    o: ObjectInfo,
    cached?: TreeCacheLine,
  ): Promise<{ sha256?: string; how: 'known' | 'metadata' | 'etag' }> => {
    if (cached?.etag === o.etag) return { sha256: cached.sha256, how: 'known' };
    const head = await backend.head(o.key, signal);
    if (!head) throw new Error('gone from the bucket since it was listed');
    return head.metadata.sha256 ? { sha256: head.metadata.sha256, how: 'metadata' } : { how: 'etag' };
  };

  const one = async ({ o, seq, cached }: Listed) => {
    const parts = keyParts(o.key);
    if (!parts) throw new Error('the key would leave the models directory: not restored');
    const dest = path.join(root, ...parts);
    const st = fs.lstatSync(dest, { bigint: true, throwIfNoEntry: false });
    if (st && !st.isFile())
      throw new Error(`${dest} is ${st.isDirectory() ? 'a directory' : 'not a regular file'}: not replaced`);
    const object = await objectSha(o, cached);
    if (st && Number(st.size) === o.size) {
      // The local file's sha256: from the cache while its stat is the one it was hashed with.
      let local = lineMatches(cached, st) ? cached!.sha256 : undefined;
      if (!local) {
        result.hashed++;
        local = await hashFile(dest, signal);
      }
      const same = object.sha256 ? object.sha256 === local : await etagProvesContent(dest, o.size, o.etag, signal);
      if (same) {
        cache.settle(seq, lineOf(o.key, st, local, o.etag));
        result.inPlace++;
        return report({ action: 'in-place', key: o.key, bytes: o.size, how: object.how });
      }
    }
    const reason = st ? 'changed' : 'new';
    if (!opts.dryRun) {
      ensureDirs(root, parts.slice(0, -1), dirs);
      const sha256 = await download(opts, slots, o, dest, object.sha256);
      cache.settle(seq, lineOf(o.key, fs.statSync(dest, { bigint: true }), sha256, o.etag));
    }
    result.downloaded++;
    result.downloadedBytes += o.size;
    report({ action: 'download', key: o.key, bytes: o.size, reason });
  };

  // Each object with what the cache knows of its key, in key order (lookups go forward only).
  interface Listed {
    o: ObjectInfo;
    seq: number;
    cached?: TreeCacheLine;
  }
  const listed: Listed[] = [];
  for (const o of objects) {
    const cached = await cache.lookup(o.key);
    listed.push({ o, cached, seq: cache.reserve() });
  }

  try {
    await pool(
      listed,
      opts.files,
      async (item) => {
        const o = item.o;
        try {
          await one(item);
        } catch (e) {
          if (signal?.aborted) throw signal.reason;
          cache.settle(item.seq, item.cached);
          const error = e instanceof Error ? e.message : String(e);
          result.failures.push({ key: o.key, error });
          report({ action: 'failed', key: o.key, bytes: o.size, error });
          if (e instanceof StorageError && e.fatal) throw e;
        }
      },
      signal,
    );
  } finally {
    // Keeps what it passed over (keepPassedOver): complete or not, the lines it did not meet stay.
    if (!opts.dryRun) result.cacheWarning = await cache.finish(false);
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// Mello's side

/** The directory the bundle is brought into on Verda: made by mktemp, removed by the bundle itself. */
const BROUGHT_DIR = /^comfymulti-restore\.[A-Za-z0-9]{8}$/;

// One command: Node.js 20 there (127: none, 126: too old, its version said), the bundle's $1
// bytes from stdin into a new private directory, then Node runs it, which reads the request that
// follows on the same stdin and removes the directory once loaded.
const BRING_AND_RUN = `command -v node >/dev/null 2>&1 || exit 127
v=$(node --version 2>/dev/null)
case $v in v[2-9][0-9].* | v[1-9][0-9][0-9].*) ;; *) printf 'node %s\\n' "$v" >&2; exit 126 ;; esac
umask 077
d=$(mktemp -d "\${TMPDIR:-/tmp}/comfymulti-restore.XXXXXXXX") || exit 1
head -c "$1" > "$d/restore-verda.mjs" || { rm -rf -- "$d"; exit 1; }
exec node "$d/restore-verda.mjs" ${MODELS_HERE_FLAG}`;

export interface ModelsRestoreStepOptions {
  host: Host;
  /** Undefined only when the step is skipped (no models bucket needed). */
  target: BucketTarget | undefined;
  modelsDir: string;
  hashCacheFile: string;
  limits: Limits;
  source: RestoreSource;
  /** restore-verda's bundle (one file): what Verda runs. */
  bundle: () => Promise<Buffer>;
  skipReason?: string;
}

export function modelsRestoreStep(o: ModelsRestoreStepOptions): Step {
  const bucket = o.target?.bucket ?? 'models bucket';
  return {
    name: 'Models (downloaded by Verda)',
    moves: `r2://${bucket}/ → ${o.host.label}:${o.modelsDir}/ (what is missing or differs)`,
    skipReason: o.skipReason,
    async run(ctx) {
      if (!o.source.checked)
        return { status: 'skipped', summary: 'not restored: the backup did not check out (step 1)' };
      if (!o.target) throw new Error('no models bucket configured');
      const code = await o.bundle();
      const request: ModelsRestoreRequest = {
        target: o.target,
        modelsDir: o.modelsDir,
        hashCacheFile: o.hashCacheFile,
        dryRun: ctx.dryRun,
        limits: o.limits,
      };
      // The bundle, then the request (with the models bucket's credentials) on stdin, never on a
      // command line; stdin then stays open: Verda stops when it closes (this side is gone).
      // stdin held open: Verda's side stops (and cleans up) when Mello is gone.
      const r = await o.host.run(['sh', '-c', BRING_AND_RUN, 'sh', String(code.length)], {
        input: Buffer.concat([code, Buffer.from(JSON.stringify(request) + '\n')]),
        holdStdin: true,
        signal: ctx.signal,
        onStderr: (text) =>
          text
            .split('\n')
            .filter(Boolean)
            .forEach((line) => ctx.out.detail(`verda: ${line}`)),
      });
      if (r.code === 126 || r.code === 127) {
        const found =
          r.code === 127 ? 'none on the PATH of a non-interactive SSH login' : r.stderr.trim().replace(/^node /, '');
        throw new Error(
          `Node.js 20 or newer is needed on ${o.host.label} to download the models (found: ${found}): ` +
            `install it there, then run restore-verda.mts --only models`,
        );
      }
      let result: (RestoreTreeResult & { error?: string; cacheWarning?: string; notices?: string[] }) | undefined;
      try {
        result = JSON.parse(r.stdout.trim().split('\n').pop() ?? '');
      } catch {
        /* not its output: it did not start */
      }
      if (!result) {
        // ssh's 255: the connection went (its stderr holds Verda's progress lines, not why).
        const lost = r.code === 255 && o.host.label !== 'local' ? 'the SSH connection was lost; ' : '';
        const said = lost + r.stderr.trim().split('\n').slice(-2).join('; ');
        throw new Error(
          `restore-verda ${MODELS_HERE_FLAG} on ${o.host.label} failed (exit ${r.code}): ${said || 'no output'}`,
        );
      }
      for (const notice of result.notices ?? []) addNotice(`on ${o.host.label}: ${notice}`);
      if (result.error) throw new Error(`on ${o.host.label}: ${result.error}`);
      for (const a of result.actions) {
        if (a.action === 'download' && ctx.dryRun)
          ctx.out.info(`would download ${printable(a.key)} (${humanSize(a.bytes)}, ${a.reason})`);
        else if (a.action === 'download')
          ctx.out.detail(`downloaded ${printable(a.key)} (${humanSize(a.bytes)}, ${a.reason})`);
        else if (a.action === 'in-place') ctx.out.detail(`in place ${printable(a.key)} (${a.how})`);
      }
      const verb = ctx.dryRun ? 'to download' : 'downloaded';
      return {
        summary:
          `${result.objects} models (${humanSize(result.bytes)}): ` +
          `${result.downloaded} ${verb} (${humanSize(result.downloadedBytes)}), ${result.inPlace} already in place`,
        bytes: ctx.dryRun ? 0 : result.downloadedBytes,
        warnings: result.cacheWarning ? [`on ${o.host.label}: ${result.cacheWarning}`] : [],
        failures: result.failures.map((f) => `${printable(f.key)}: ${f.error}`),
        data: { ...result, bucket },
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Verda's side

/**
 * `restore-verda.mjs --models-here` on Verda: reads the request line, restores the models,
 * prints the result as one JSON line. Stops (removing what it was writing) when stdin closes:
 * Mello is gone, or the link dropped.
 */
export async function runModelsRestoreHere(): Promise<never> {
  let done = 0;
  let bytes = 0;
  return answerRequest<ModelsRestoreRequest, RestoreTreeResult>(
    async (request, signal) => {
      // Brought by Mello into a directory of its own (see BRING_AND_RUN): loaded now, so removed.
      const brought = path.dirname(process.argv[1] ?? '');
      if (BROUGHT_DIR.test(path.basename(brought))) fs.rmSync(brought, { recursive: true, force: true });
      const limits = request.limits ?? DEFAULT_LIMITS;
      return restoreTree({
        root: request.modelsDir,
        backend: new R2Backend(request.target, r2Limits(limits)),
        cache: await TreeCache.open(request.hashCacheFile, { write: !request.dryRun, keepPassedOver: true }),
        dryRun: request.dryRun,
        signal,
        attempts: limits.r2Attempts,
        backoffMs: limits.r2BackoffMs,
        idleTimeoutMs: limits.r2IdleTimeoutMs,
        onBytes: (n) => (bytes += n),
        onFile: (a) => {
          done++;
          process.stderr.write(`${a.action} ${printable(a.key)}\n`);
        },
      });
    },
    () => `${done} models decided, ${humanSize(bytes)} downloaded`,
  );
}

// ---------------------------------------------------------------------------------------------
// The bundle Verda runs

/** The checkout (or installed copy) the running script is in: a bundle's is its parent's. */
function scriptRoot(): string {
  const dir = path.dirname(fs.realpathSync(process.argv[1] ?? '.'));
  return path.basename(dir) === 'dist' ? path.dirname(dir) : dir;
}

/** The newest mtime of the script and every file under lib/ (lib/launch.sh's rule for a stale bundle). */
function newestSource(root: string, script: string): number {
  let newest = fs.statSync(path.join(root, `${script}.mts`)).mtimeMs;
  const visit = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) visit(p);
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  visit(path.join(root, 'lib'));
  return newest;
}

// CommonJS dependencies inside an ES module bundle still call require() for Node's builtins.
const BANNER =
  "import { createRequire as __createRequire } from 'node:module'; " +
  'const require = __createRequire(import.meta.url);';

/**
 * A script as one file Node 20 runs anywhere: `dist/single/NAME.mjs` (built without chunks) while
 * it is newer than every source, else bundled now, in memory, with build.mjs's settings (an
 * installed copy has no dist/).
 */
export async function scriptBundle(script: string): Promise<Buffer> {
  const root = scriptRoot();
  const built = path.join(root, 'dist', 'single', `${script}.mjs`);
  const st = fs.statSync(built, { throwIfNoEntry: false });
  if (st?.isFile() && st.mtimeMs > newestSource(root, script)) return fs.readFileSync(built);
  // esbuild cannot be bundled (its binary): it is external to the bundles, loaded here on Mello.
  const { build } = await import('esbuild');
  const r = await build({
    entryPoints: [path.join(root, `${script}.mts`)],
    bundle: true,
    write: false,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['esbuild'],
    banner: { js: BANNER },
    logLevel: 'silent',
  });
  return Buffer.from(r.outputFiles[0].contents);
}
