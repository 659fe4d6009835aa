// The download engine: objects into a local tree, where they are missing or differ: the objects
// under a key prefix, or a stream of items given (each: where to GET it, its path under the root,
// its mtime), as restore-mello --as-of gives the versions current at a time. restore-verda's
// models (run on Verda) and restore-mello (the users' files on Mello) both go through
// downloadTree; they differ only in options.
//
// Each object that is missing or differs is downloaded in ranged GETs, several in flight per
// file, written under a temporary name (O_EXCL, never through a symlink), its sha256 taken in
// order as the ranges land, checked against the object's `sha256` metadata (or its ETag, for
// bash-era uploads), fsynced and renamed: no partial file ever stands under a final name. A
// local file with the object's size and sha256 (by the tree's hash cache, else read once) is
// left alone. Nothing is ever deleted, and a key that would leave the root (`..`, an absolute
// key, a symlink in the way) is refused, never followed. The listing, the hash cache and the
// decisions are streams in key order: memory stays bounded whatever the number of objects.
import { setMaxListeners } from 'node:events';
import crypto from 'node:crypto';
import { constants as FS } from 'node:fs';
import fs from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { DEFAULT_LIMITS } from './config.ts';
import { MiB, partialName, removeStalePartials } from './files.ts';
import { TreeCache, etagProvesContent, hashFile, lineMatches, lineOf, type TreeCacheLine } from './hash-cache.ts';
import { Pacer, Slots } from './pacer.ts';
import { pool } from './pool.ts';
import { StorageError, type Backend, type ObjectInfo } from './storage.ts';

/** Bytes written to a file between two datasyncs of it (see downloadObject). */
const WRITE_BACK = 32 * MiB;
/** Decisions and failures a result lists (--json); the rest are only counted. */
const KEEP = 1000;

export type DownloadAction =
  | { action: 'download'; key: string; bytes: number; reason: 'new' | 'changed' }
  | { action: 'in-place'; key: string; bytes: number; how: 'known' | 'metadata' | 'etag' }
  /** A local file that differs and is newer than its object (keepNewer), or differs (keepDiffering): left as it is. */
  | { action: 'kept'; key: string; bytes: number }
  | { action: 'failed'; key: string; bytes: number; error: string };

export interface DownloadTreeResult {
  /** Objects listed (under the prefix) and their bytes. */
  objects: number;
  bytes: number;
  downloaded: number;
  downloadedBytes: number;
  inPlace: number;
  /** Local files newer than their object, left as they are (keepNewer without overwrite). */
  kept: number;
  /** Local files read to learn their sha256 (the hash cache knew the others). */
  hashed: number;
  /** The first failures; failureCount counts them all. */
  failures: { key: string; error: string }[];
  failureCount: number;
  /** The first decisions; actionCount counts them all. */
  actions: DownloadAction[];
  actionCount: number;
  /** Set when the hash cache could not be saved (a full disk): a warning. */
  cacheWarning?: string;
}

/** One object to download: where to GET it, its path under the root, its mtime. */
export interface DownloadItem {
  /** The object, as listed: its key is what is GET. */
  object: ObjectInfo;
  /** The backend that holds it; the tree's (`backend`) when unset. */
  from?: Backend;
  /** Its path under the root, `/`-separated (checked: never out of the root). */
  rel: string;
  /** The mtime the file gets (ms); unset: the object's Last-Modified with objectTimes, else now. */
  mtimeMs?: number;
  /** The object's sha256, when the caller knows it already: no HEAD is made for it. */
  sha256?: string;
}

export interface DownloadTreeOptions {
  /** The local directory the keys land under (made when missing). */
  root: string;
  /** The tree's backend: what is listed, and what an item without `from` is read from. */
  backend: Backend;
  /** The key prefix that `root` stands for (`user_data/`); '' for the bucket's top. */
  prefix?: string;
  /** Only the keys under `prefix + under` (`user007/`): the rest of the tree is not looked at. */
  under?: string;
  /**
   * The objects to download, in the order of their `rel` (compareKeys: the hash cache is read
   * forward only), instead of the listing of `prefix + under`.
   */
  items?: AsyncIterable<DownloadItem>;
  /**
   * The tree's hash cache, keyed by the path under `root` (backup-mello's and the models' own),
   * read and written in key order; lines of files not met are kept. None: every file is read.
   */
  cache?: TreeCache;
  dryRun?: boolean;
  signal?: AbortSignal;
  /**
   * A local file that differs from its object and is newer (its mtime after the object's
   * Last-Modified, or that time unknown) is kept, not replaced: restore-mello without --overwrite.
   */
  keepNewer?: boolean;
  /** A local file that differs from its object is kept, not replaced, whatever its time (restore-mello --as-of). */
  keepDiffering?: boolean;
  /** A downloaded file gets its object's Last-Modified as its mtime (as `aws s3 sync` does). */
  objectTimes?: boolean;
  /**
   * A downloaded file gets the permission bits its object recorded (metadata `mode`, the models'),
   * else 0644, whatever the umask: the worker container reads the models as another uid.
   */
  modes?: boolean;
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
  onFile?: (a: DownloadAction) => void;
  /**
   * Bytes downloaded, as they land; `toDownload` is the bytes of the objects decided to download
   * so far (those already in place are no work: a morning with SFS kept is not "3 % done").
   */
  onBytes?: (
    n: number,
    toDownload: number,
    file: { key: string; bytes: number; size: number },
    /** The listing still goes on (the total is still growing). */
    counting: boolean,
  ) => void;
}

/** The defaults: a lone big model gets 8 streams (R2 gives each connection a share, not the whole link). */
const DOWNLOAD_DEFAULTS = {
  files: 4,
  rangeSize: 8 * MiB,
  rangesPerFile: 8,
  // 16 in all bound the connections, and the bytes held ahead of the hash (16 × 8 MiB at most).
  rangesInFlight: 16,
  attempts: DEFAULT_LIMITS.r2Attempts,
  backoffMs: DEFAULT_LIMITS.r2BackoffMs,
  idleTimeoutMs: DEFAULT_LIMITS.r2IdleTimeoutMs,
};

type Settings = typeof DOWNLOAD_DEFAULTS & DownloadTreeOptions & { prefix: string };

/** A key (below the prefix) as path components under the root, or undefined for one that would leave it. */
export function keyParts(rel: string): string[] | undefined {
  const parts = rel.split('/');
  return parts.some((p) => p === '' || p === '.' || p === '..' || p.includes('\0')) ? undefined : parts;
}

/**
 * The directory of `parts` under root: each component must be a directory (a symlink or a file
 * in the way is an error, never followed out of the root). With `create`, the missing ones are
 * made; without, a missing one means nothing is there yet (undefined). Components already seen
 * are not looked at again.
 */
export function directoryOf(root: string, parts: string[], seen: Set<string>, create: boolean): string | undefined {
  let dir = root;
  for (const part of [undefined, ...parts]) {
    if (part !== undefined) dir = path.join(dir, part);
    if (seen.has(dir)) continue;
    if (create) {
      try {
        // The root may be missing with its parents (a new disk); below it, one level at a time.
        // 0755 whatever the umask: what lands here is read by other users (the worker container).
        if (fs.mkdirSync(dir, { mode: 0o755, recursive: part === undefined }) !== undefined || part !== undefined)
          fs.chmodSync(dir, 0o755);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
    }
    // The root itself is the admin's to choose (a symlink to another disk is followed).
    const st =
      part === undefined ? fs.statSync(dir, { throwIfNoEntry: false }) : fs.lstatSync(dir, { throwIfNoEntry: false });
    if (!st) {
      if (create) throw new Error(`${dir} vanished as it was made`);
      return undefined;
    }
    if (!st.isDirectory())
      throw new Error(`${dir} is ${st.isSymbolicLink() ? 'a symlink' : 'not a directory'}: not followed`);
    seen.add(dir);
  }
  return dir;
}

/** The permission bits an object recorded (`644`), or undefined; never setuid, setgid or sticky. */
function recordedMode(text: string | undefined): number | undefined {
  return text && /^[0-7]{3,4}$/.test(text) ? parseInt(text, 8) & 0o777 : undefined;
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
 * once the sha256 is the object's (or its ETag proves the bytes), fsynced first. Returns the
 * sha256 and the file's stat after the rename (what its hash cache line records).
 */
async function downloadObject(
  opts: Settings,
  slots: Slots,
  item: DownloadItem,
  dest: string,
  object: Promise<{ sha256?: string; mode?: number }>,
  order: number,
  onBytes?: (n: number, file: { key: string; bytes: number; size: number }) => void,
): Promise<{ sha256: string; stat: fs.BigIntStats }> {
  const { signal } = opts;
  const o = item.object;
  const backend = item.from ?? opts.backend;
  // Asked while the ranges already move (a HEAD is a round trip): awaited before the comparison.
  object.catch(() => {});
  const tmp = partialName(dest);
  const fh = await fs.promises.open(tmp, FS.O_WRONLY | FS.O_CREAT | FS.O_EXCL | FS.O_NOFOLLOW, 0o644);
  const ranges: Range[] = [];
  let fileBytes = 0;
  for (let start = 0; start < o.size; start += opts.rangeSize) {
    ranges.push({ start, end: Math.min(o.size, start + opts.rangeSize), received: 0, written: 0, held: [] });
  }
  // One failure stops the other ranges of this file.
  const stop = new AbortController();
  setMaxListeners(0, stop.signal); // each range in flight listens on it
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
              fileBytes += chunk.length;
              onBytes?.(chunk.length, { key: o.key, bytes: fileBytes, size: o.size });
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

  let renamed = false;
  try {
    // The file begun first gets the free slots first: files end one after another, and the next
    // one's ranges fill the slots a file near its end no longer needs (with slots served in turn,
    // the files in the pool would all end together and leave the link idle between them).
    await pool(ranges, opts.rangesPerFile, (r) =>
      slots
        .run(() => fetchRange(r), order)
        .catch((e) => {
          stop.abort(e);
          throw e;
        }),
    );
    advance();
    if (hashed !== o.size) throw new Error(`${o.key}: ${hashed} bytes hashed of ${o.size}`);
    const sha256 = hash.digest('hex');
    const { sha256: wantSha256, mode } = await object;
    if (wantSha256 ? sha256 !== wantSha256 : !(await etagProvesContent(tmp, o.size, o.etag, signal))) {
      throw new Error(
        `the bytes downloaded are not the object's (${wantSha256 ? 'sha256' : 'ETag'} differs): not restored`,
      );
    }
    await syncing;
    if (syncError) throw new WriteFailed(`${tmp}: ${(syncError as NodeJS.ErrnoException).code ?? syncError}`);
    const mtimeMs = item.mtimeMs ?? (opts.objectTimes ? o.modifiedMs : undefined);
    if (mtimeMs !== undefined) {
      const when = new Date(mtimeMs);
      await fh.utimes(when, when);
    }
    if (mode !== undefined) await fh.chmod(mode);
    await fh.sync();
    await fs.promises.rename(tmp, dest);
    renamed = true;
    // The stat after the rename (which sets the ctime), of the file written, whatever the path holds now.
    const stat = await fh.stat({ bigint: true });
    await fh.close();
    return { sha256, stat };
  } catch (e) {
    stop.abort(e);
    await syncing;
    await fh.close().catch(() => {});
    if (!renamed) await fs.promises.rm(tmp, { force: true });
    throw signal?.aborted ? signal.reason : e;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** An item with what the hash cache knows of its path, in key order. */
interface Listed {
  item: DownloadItem;
  seq: number;
  cached?: TreeCacheLine;
}

/** Every object under the prefix (or every item given) into `root`, where missing or different. Never deletes. */
export async function downloadTree(options: DownloadTreeOptions): Promise<DownloadTreeResult> {
  const opts: Settings = { ...DOWNLOAD_DEFAULTS, ...options, prefix: options.prefix ?? '' };
  const { backend, cache, signal, root } = opts;
  const result: DownloadTreeResult = {
    objects: 0,
    bytes: 0,
    downloaded: 0,
    downloadedBytes: 0,
    inPlace: 0,
    kept: 0,
    hashed: 0,
    failures: [],
    failureCount: 0,
    actions: [],
    actionCount: 0,
  };
  const report = (a: DownloadAction) => {
    result.actionCount++;
    if (result.actions.length < KEEP) result.actions.push(a);
    opts.onFile?.(a);
  };
  const slots = new Slots(opts.rangesInFlight);
  /** Downloads begun so far: each one's order is its priority for the slots. */
  let begun = 0;
  const dirs = new Set<string>();
  const cleaned = new Set<string>();
  let toDownload = 0;
  let listedAll = false;
  const onBytes = opts.onBytes
    ? (n: number, file: { key: string; bytes: number; size: number }) => opts.onBytes!(n, toDownload, file, !listedAll)
    : undefined;

  // The hash cache's ETags name objects of the tree's own backend: an item from another (a
  // version) is never known by one, nor recorded with it.
  const ownEtag = (item: DownloadItem) => (!item.from || item.from === backend ? item.object.etag : undefined);

  /** The object's sha256: given, remembered with its ETag, else its metadata; undefined for a bash-era upload. */
  const objectSha = async (
    item: DownloadItem,
    cached?: TreeCacheLine,
  ): Promise<{ sha256?: string; how: 'known' | 'metadata' | 'etag'; mode?: number; headed?: true }> => {
    const o = item.object;
    if (item.sha256) return { sha256: item.sha256, how: 'metadata' };
    if (cached?.etag !== undefined && cached.etag === ownEtag(item)) return { sha256: cached.sha256, how: 'known' };
    const head = await (item.from ?? backend).head(o.key, signal);
    if (!head) throw new Error('gone from the bucket since it was listed');
    const mode = recordedMode(head.metadata.mode);
    return head.metadata.sha256
      ? { sha256: head.metadata.sha256, how: 'metadata', mode, headed: true }
      : { how: 'etag', mode, headed: true };
  };

  const one = async ({ item, seq, cached }: Listed) => {
    const { object: o, rel } = item;
    const parts = keyParts(rel);
    if (!parts) throw new Error(`the key would leave ${root} (an empty, "." or ".." part): not restored`);
    // Nothing under a symlink is looked at, not even to compare.
    const there = directoryOf(root, parts.slice(0, -1), dirs, false);
    const dest = path.join(root, ...parts);
    const st = there === undefined ? undefined : fs.lstatSync(dest, { bigint: true, throwIfNoEntry: false });
    if (st && !st.isFile())
      throw new Error(`${dest} is ${st.isDirectory() ? 'a directory' : 'not a regular file'}: not replaced`);
    // Needed now only to compare with a local file; for a new one, asked as its download begins.
    const object = st ? await objectSha(item, cached) : undefined;
    let local: string | undefined;
    if (st && object && Number(st.size) === o.size) {
      // The local file's sha256: from the cache while its stat is the one it was hashed with.
      local = lineMatches(cached, st) ? cached!.sha256 : undefined;
      if (!local) {
        result.hashed++;
        local = await hashFile(dest, signal);
      }
      const same = object.sha256 ? object.sha256 === local : await etagProvesContent(dest, o.size, o.etag, signal);
      if (same) {
        cache?.settle(seq, lineOf(rel, st, local, ownEtag(item)));
        result.inPlace++;
        return report({ action: 'in-place', key: o.key, bytes: o.size, how: object.how });
      }
    }
    const newer = (s: fs.BigIntStats) => o.modifiedMs === undefined || Number(s.mtimeNs / 1_000_000n) > o.modifiedMs;
    if (st && (opts.keepDiffering || (opts.keepNewer && newer(st)))) {
      // Changed here since the object was sent (not backed up yet), or not what it was at the
      // time asked for: the admin's to decide.
      cache?.settle(seq, local ? lineOf(rel, st, local) : cached);
      result.kept++;
      return report({ action: 'kept', key: o.key, bytes: o.size });
    }
    const reason = st ? 'changed' : 'new';
    toDownload += o.size;
    if (!opts.dryRun) {
      const dir = directoryOf(root, parts.slice(0, -1), dirs, true)!;
      if (!cleaned.has(dir)) {
        // What a killed run left here (its writer gone) is removed before anything is written.
        removeStalePartials(dir);
        cleaned.add(dir);
      }
      // The object's sha256 and mode, for a file not there yet, are asked beside the first ranges.
      const wanted = (object ? Promise.resolve(object) : objectSha(item, cached)).then(async (known) => ({
        sha256: known.sha256,
        // A HEAD already made said the mode, or that none was recorded: not asked twice.
        mode: opts.modes
          ? (known.mode ?? (known.headed ? undefined : (await objectSha(item)).mode) ?? 0o644)
          : undefined,
      }));
      const done = await downloadObject(opts, slots, item, dest, wanted, begun++, onBytes);
      cache?.settle(seq, lineOf(rel, done.stat, done.sha256, ownEtag(item)));
    }
    result.downloaded++;
    result.downloadedBytes += o.size;
    report({ action: 'download', key: o.key, bytes: o.size, reason });
  };

  /** The objects under the prefix, as items. */
  async function* listing(): AsyncGenerator<DownloadItem> {
    for await (const o of backend.list(opts.prefix + (opts.under ?? ''), signal)) {
      if (o.key.endsWith('/')) continue; // a "directory" placeholder, not a file
      yield { object: o, rel: o.key.slice(opts.prefix.length) };
    }
  }

  // Each item with what the cache knows of its path, in key order (lookups go forward only),
  // taken as the work goes: a million keys are never held at once.
  async function* listed(): AsyncGenerator<Listed> {
    for await (const item of opts.items ?? listing()) {
      result.objects++;
      result.bytes += item.object.size;
      const cached = await cache?.lookup(item.rel);
      yield { item, cached, seq: cache?.reserve() ?? -1 };
    }
    listedAll = true;
  }

  try {
    await pool(
      listed(),
      opts.files,
      async (item) => {
        const o = item.item.object;
        try {
          await one(item);
        } catch (e) {
          if (signal?.aborted) throw signal.reason;
          cache?.settle(item.seq, item.cached);
          const error = e instanceof Error ? e.message : String(e);
          result.failureCount++;
          if (result.failures.length < KEEP) result.failures.push({ key: o.key, error });
          report({ action: 'failed', key: o.key, bytes: o.size, error });
          if (e instanceof StorageError && e.fatal) throw e;
        }
      },
      signal,
    );
  } finally {
    // Keeps what it passed over (keepPassedOver): complete or not, the lines it did not meet stay.
    if (!opts.dryRun && cache) result.cacheWarning = await cache.finish(false);
  }
  return result;
}
