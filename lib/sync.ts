// A tree to a bucket prefix, sending only what is not already there. An object is skipped when
// its size and sha256 match: the sha256 comes from the local hash cache, and the object's from
// what the cache recorded for its ETag (no request), else its `sha256` metadata (one HEAD), else
// an ETag that proves the content (objects the bash scripts uploaded). Never deletes.
import fs from 'node:fs';
import { etagProvesContent, type HashCache } from './hash-cache.ts';
import { walkTree, type WalkedFile } from './files.ts';
import { pool } from './pool.ts';
import { SourceChanged, StorageError, fingerprintFile, fingerprintedSource, readBackSha256, type Backend, type ObjectInfo } from './storage.ts';
import { errorText, humanSize } from './cli.ts';
import type { Step } from './plan.ts';

export interface SyncOptions {
  root: string;
  backend: Backend;
  /** Key prefix, `outputs/`; empty for the bucket's top. */
  prefix: string;
  cache: HashCache;
  dryRun?: boolean;
  signal?: AbortSignal;
  /** Files in flight at once (each multipart file has its own parts in flight too). */
  concurrency?: number;
  /** Only files whose relative path this accepts (e.g. `*.safetensors`). */
  filter?: (rel: string) => boolean;
  onProgress?: (sentBytes: number, totalBytes: number) => void;
  /** Told of each file as it is decided, for verbose and dry-run lines. */
  onFile?: (action: FileAction) => void;
}

export type FileAction =
  | { action: 'send'; key: string; bytes: number; sha256: string; reason: 'new' | 'changed' }
  | { action: 'skip'; key: string; bytes: number; sha256: string; how: 'known' | 'metadata' | 'etag' }
  | { action: 'failed'; key: string; bytes: number; error: string };

export interface SyncResult {
  files: number;
  bytes: number;
  sent: number;
  sentBytes: number;
  skipped: number;
  /** Skipped objects proven by ETag alone (bash-era uploads), now recorded. */
  adopted: number;
  hashed: number;
  symlinks: string[];
  failures: { key: string; error: string }[];
  /** Files that vanished between the walk and their upload: not an error (rclone and restic agree). */
  vanished: string[];
  actions: FileAction[];
}

/** The ID an object is remembered under in the hash cache. */
export const objectId = (backend: Backend, key: string) => `${backend.name}/${key}`;

export async function syncTree(opts: SyncOptions): Promise<SyncResult> {
  const { backend, prefix, cache, signal } = opts;
  // The walk and the listing at once: on an unchanged rerun they are nearly all the work.
  const listing = (async () => {
    const remote = new Map<string, ObjectInfo>();
    for await (const o of backend.list(prefix, signal)) remote.set(o.key, o);
    return remote;
  })();
  listing.catch(() => {}); // awaited below, after the walk
  const walked = await walkTree(opts.root);
  const remote = await listing;
  const files = opts.filter ? walked.files.filter((f) => opts.filter!(f.rel)) : walked.files;
  cache.prune(opts.root, new Set(walked.files.map((f) => f.path)));

  const totalBytes = files.reduce((n, f) => n + Number(f.stat.size), 0);
  const hashedBefore = cache.hashedFiles;
  const result: SyncResult = {
    files: files.length,
    bytes: totalBytes,
    sent: 0,
    sentBytes: 0,
    skipped: 0,
    adopted: 0,
    hashed: 0,
    symlinks: walked.symlinks,
    failures: walked.unreadable.map((u) => ({ key: prefix + u.rel, error: u.error })),
    vanished: [],
    actions: [],
  };
  let progressBytes = 0;
  const report = (a: FileAction) => {
    result.actions.push(a);
    opts.onFile?.(a);
  };

  const one = async (file: WalkedFile) => {
    const key = prefix + file.rel;
    const hashed = await cache.hash(file.path, { size: file.stat.size, mtimeNs: file.stat.mtimeNs, ino: file.stat.ino }, signal);
    const sha256 = hashed.sha256;
    const size = hashed.fingerprint?.size ?? Number(file.stat.size);
    const there = remote.get(key);
    if (there && there.size === size) {
      const id = objectId(backend, key);
      if (cache.knownObject(id, there.etag) === sha256) {
        result.skipped++;
        return report({ action: 'skip', key, bytes: size, sha256, how: 'known' });
      }
      const head = await backend.head(key, signal);
      if (head && head.size === size) {
        const how = head.metadata.sha256
          ? head.metadata.sha256 === sha256 && 'metadata'
          : (await etagProvesContent(file.path, size, head.etag, signal)) && 'etag';
        if (how) {
          if (!opts.dryRun) cache.recordObject(id, head.etag, sha256);
          result.skipped++;
          if (how === 'etag') result.adopted++;
          return report({ action: 'skip', key, bytes: size, sha256, how });
        }
      }
    }
    const reason = there ? 'changed' : 'new';
    if (opts.dryRun) {
      result.sent++;
      result.sentBytes += size;
      return report({ action: 'send', key, bytes: size, sha256, reason });
    }
    // What is sent is checked against a fingerprint taken from one read of the file, so the
    // object's sha256 metadata is always its bytes' (a file read from the cache is read again).
    let fp = hashed.fingerprint;
    if (!fp) {
      fp = await fingerprintFile(file.path, signal);
      cache.remember(file.path, fp);
    }
    let counted = 0;
    const put = await backend.put(key, fingerprintedSource(file.path, fp), {
      metadata: { sha256: fp.sha256 },
      signal,
      onBytes: opts.onProgress
        ? (n) => {
            counted += n;
            progressBytes += n;
            opts.onProgress!(progressBytes, totalBytes);
          }
        : undefined,
    });
    cache.recordObject(objectId(backend, key), put.etag, fp.sha256);
    result.sent++;
    result.sentBytes += fp.size;
    progressBytes += fp.size - counted;
    report({ action: 'send', key, bytes: fp.size, sha256: fp.sha256, reason });
  };

  try {
    // Files in path order, 16 in flight. Each failure is recorded and the others go on; only
    // credentials refused or the bucket gone stops the pool: every other file would fail the same.
    await pool(
      files,
      opts.concurrency ?? 16,
      async (file) => {
        try {
          await one(file);
        } catch (e) {
          if (signal?.aborted) throw signal.reason;
          if (e instanceof SourceChanged && e.vanished) {
            result.vanished.push(prefix + file.rel);
            return;
          }
          const error = errorText(e);
          result.failures.push({ key: prefix + file.rel, error });
          report({ action: 'failed', key: prefix + file.rel, bytes: Number(file.stat.size), error });
          if (e instanceof StorageError && e.fatal) throw e;
        }
      },
      signal,
    );
  } finally {
    result.hashed = cache.hashedFiles - hashedBefore;
  }
  return result;
}


/** A key or path as one printable line: control characters (a newline in a name) escaped. */
export function printable(name: string): string {
  return name.replace(/[\x00-\x1f\x7f]/g, (c) => JSON.stringify(c).slice(1, -1));
}

export interface SyncStepOptions {
  name: string;
  root: string;
  backend: Backend;
  prefix: string;
  cache: HashCache;
  filter?: (rel: string) => boolean;
}

/** The step that syncs one tree: a missing source is a warning and a skipped row. */
export function syncStep(o: SyncStepOptions): Step {
  return {
    name: o.name,
    moves: `${o.root}/ → ${o.backend.name}/${o.prefix}`,
    async run(ctx) {
      if (!fs.existsSync(o.root)) {
        return { status: 'skipped', summary: `nothing to send`, warnings: [`${o.root} does not exist`] };
      }
      const started = Date.now();
      const label = o.prefix || o.backend.name;
      let r: SyncResult;
      let cacheWarning: string | undefined;
      try {
        r = await syncTree({
          ...o,
          dryRun: ctx.dryRun,
          signal: ctx.signal,
          onProgress: ctx.out.fancy ? (done, total) => ctx.out.progress(label, done, total, started) : undefined,
          onFile: (a) => {
            const where = `${o.backend.name}/${printable(a.key)}`;
            if (a.action === 'send') {
              if (ctx.dryRun) ctx.out.info(`would send ${where} (${humanSize(a.bytes)}, ${a.reason})`);
              else ctx.out.detail(`sent ${where} (${humanSize(a.bytes)}, ${a.reason})`);
            } else if (a.action === 'skip') ctx.out.detail(`unchanged ${where} (${a.how})`);
          },
        });
      } finally {
        ctx.out.clearProgress();
        if (!ctx.dryRun) cacheWarning = saveCache(o.cache);
      }
      const parts = [`${r.sent} ${ctx.dryRun ? 'to send' : 'sent'} (${humanSize(r.sentBytes)})`, `${r.skipped} unchanged`];
      if (r.adopted) parts.push(`${r.adopted} adopted from earlier uploads`);
      if (r.symlinks.length) parts.push(`${r.symlinks.length} symlinks not followed`);
      const warnings = r.vanished.map((k) => `${printable(k)} vanished before it was sent (deleted meanwhile): not backed up`);
      if (cacheWarning) warnings.push(cacheWarning);
      return {
        summary: `${r.files} ${r.files === 1 ? 'file' : 'files'} (${humanSize(r.bytes)}): ${parts.join(', ')}`,
        bytes: r.sentBytes,
        warnings,
        failures: r.failures.map((f) => `${printable(f.key)}: ${f.error}`),
        data: {
          files: r.files,
          bytes: r.bytes,
          sent: r.sent,
          sentBytes: r.sentBytes,
          skipped: r.skipped,
          adopted: r.adopted,
          hashed: r.hashed,
          vanished: r.vanished,
          symlinksNotFollowed: r.symlinks,
          objects: r.actions,
        },
      };
    },
  };
}

/**
 * Saves a hash cache; a cache that cannot be written (a full disk) costs only re-hashing next
 * time, so it is a warning naming the file, and never replaces the result of uploads that worked.
 */
export function saveCache(cache: HashCache): string | undefined {
  try {
    cache.save();
    return undefined;
  } catch (e) {
    return `hash cache not saved (${errorText(e)}): unchanged files will be hashed again next run`;
  }
}

/**
 * --verify for a tree: every local file is in the bucket with its size and sha256 (what a dry
 * run would send is what is missing or differs). With `deep`, the objects found equal are read
 * back and hashed too. Changes nothing: the hash cache is not saved.
 */
export function verifyStep(o: SyncStepOptions & { deep: boolean }): Step {
  return {
    name: `${o.name}: verify`,
    moves: `${o.root}/ against ${o.backend.name}/${o.prefix}`,
    async run(ctx) {
      if (!fs.existsSync(o.root)) return { status: 'skipped', summary: 'nothing to verify', warnings: [`${o.root} does not exist`] };
      const r = await syncTree({ ...o, dryRun: true, signal: ctx.signal });
      const failures = r.failures.map((f) => `${printable(f.key)}: ${f.error}`);
      for (const a of r.actions) {
        if (a.action === 'send') failures.push(`${a.reason === 'new' ? 'missing' : 'differs'}: ${o.backend.name}/${printable(a.key)}`);
      }
      if (o.deep) {
        const equal = r.actions.filter((a): a is Extract<FileAction, { action: 'skip' }> => a.action === 'skip');
        await pool(equal, 8, async (a) => {
          if ((await readBackSha256(o.backend, a.key, ctx.signal)) !== a.sha256) {
            failures.push(`differs: ${o.backend.name}/${printable(a.key)} bytes read back are not the file's`);
          }
        }, ctx.signal);
      }
      return { summary: `${r.files - failures.length} of ${r.files} files in place${o.deep ? ', read back' : ''}`, failures };
    },
  };
}
