// Restoring Verda from its backups (restore-verda.mts), the mirror of backup-verda. The source (a
// manifest in BACKUP_DIR, the newest SFS copies on Verda, or the R2 bundle) is checked whole
// before anything on Verda changes; then each config archive is streamed over the run's one
// connection into GNU tar there (no temporary file on Verda), which keeps mode, owner and mtime,
// with the services around it stopped, started or reloaded. The drill does the same into a
// temporary root on Mello and compares every restored file with its archive.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { PassThrough, pipeline as chain, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { BUNDLE_KEY, CRON_KINDS, IMAGE_FILE, isBundleKey, listBundles, type ArchiveSpec } from './archive.ts';
import { addNotice, errorText, humanSize, printable } from './cli.ts';
import {
  ensurePrivateDir,
  hashFile,
  isRegularFile,
  openRegular,
  processAlive,
  readRegularFileSync,
  tap,
  writeStreamAtomic,
} from './files.ts';
import { melloImageDigest } from './image.ts';
import { checkObjects, decryptedNote, sizeOnlyWarnings, type Manifest, type R2Record } from './manifest.ts';
import { listPoints, recordedImage, type PointJudge, type RestorePoint } from './restore-point.ts';
import { ByteBudget, LayoutError, TarGuard, checkArchiveFile } from './layout.ts';
import { sleep } from './pacer.ts';
import { requireSfs } from './sfs.ts';
import { program } from './sh.ts';
import { failedBefore, type Step, type StepContext, type StepResult } from './step.ts';
import { datedCopies, datedPattern } from './dated.ts';
import { CommandTimeout, said, type Host } from './ssh.ts';
import type { Backend } from './storage.ts';
import { decryptStream, isEncryptedKey, requireIdentityFile } from './age.ts';

/** `--only` names, besides the config archives' kinds. */
export const IMAGE_KIND = 'image';
export const MODELS_KIND = 'models';

/** Where a restore reads its archives: a manifest in BACKUP_DIR (the newest complete one, or T's), SFS or R2. */
type FromWhere = { from: 'manifest'; stamp?: string } | { from: 'sfs' } | { from: 'r2' };

/** One config archive to restore, checked. */
export interface ArchiveRef {
  name: string;
  /** On Mello (an SFS copy is read to Mello first): streamed over the connection into tar on Verda. */
  melloFile: string;
  /** Where it was read, for messages, when not BACKUP_DIR (an SFS copy). */
  from?: string;
  /** What the bytes streamed must hash to (the manifest's), checked as they pass. */
  sha256?: string;
  bytes?: number;
  entries: number;
}

/** The worker image to have loaded: its ID, and the sha256 of its saved archive. */
export interface ImageRef {
  imageId: string;
  sha256: string;
  bytes: number;
  /** Where the ID and sha256 were read, for messages. */
  recordedIn: string;
  /** Mello's worker-image.tar.gz, when it holds exactly these bytes. */
  melloFile?: string;
}

/** What the check step found, shared by the steps after it (as a RunRecord is in a backup). */
export class RestoreSource {
  /** Set once every artifact to restore checked out: nothing is restored before. */
  checked = false;
  /** For messages: `manifest-T.json`, `SFS copies`, `r2://cache/verda-config-backup.tar.gz`. */
  label = '';
  readonly archives = new Map<string, ArchiveRef>();
  /** Kinds the source has nothing for, with why: each a skipped row. */
  readonly absent = new Map<string, string>();
  /** The IP in tailscale-ip.txt, if the source has one. */
  tailscaleIp?: string;
  /**
   * The worker images the backups record, newest first: the restore loads the newest one whose
   * bytes can still be had whole (loaded, the SFS copy, Mello's, the cache bucket's).
   */
  images: ImageRef[] = [];
  manifest?: { file: string; manifest: Manifest };
  /**
   * The manifests whose R2 objects this backup stands on: the chosen one, and when that was a
   * --quick run, the newest complete full run before it (its image and models).
   */
  readonly objectsFrom: Manifest[] = [];
  /** The models the backup records (key → its record and the run's stamp): what a restore must bring back. */
  readonly models = new Map<string, { record: R2Record; recordedIn: string }>();
  /** The newest image recorded (what a restore would want first), if any. */
  get image(): ImageRef | undefined {
    return this.images[0];
  }
  /** Private directories on Mello this run made (the R2 bundle unpacked): removed at the end. */
  readonly tempDirs: string[] = [];
  private readonly made = new Map<string, string>();

  /** A private directory of this run on Mello (made on first use, removed at the end). */
  tempDir(parent: string, prefix: string): string {
    let dir = this.made.get(prefix);
    if (!dir) {
      dir = runDir(parent, prefix);
      this.made.set(prefix, dir);
      this.tempDirs.push(dir);
    }
    return dir;
  }

  cleanup() {
    for (const dir of this.tempDirs.splice(0)) removeTree(dir);
  }
}

/** A step after the check, when the check failed: nothing at all is restored. */
const notChecked = (): StepResult => ({
  status: 'skipped',
  summary: 'not restored: the backup did not check out (step 1)',
});

/** Removes a tree this run wrote, even one whose directories were restored without write permission. */
function removeTree(dir: string) {
  const open = (d: string) => {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(d);
    } catch {
      return;
    }
    if (!st.isDirectory()) return;
    fs.chmodSync(d, 0o700);
    for (const name of fs.readdirSync(d)) open(path.join(d, name));
  };
  open(dir);
  fs.rmSync(dir, { recursive: true, force: true });
}

/** Directories `${prefix}PID-xxxx` in `dir` that a killed run left (its pid gone): they may hold secrets. */
function removeStaleRunDirs(dir: string, prefix: string) {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return;
  }
  for (const name of names) {
    const m = new RegExp(`^${prefix}(\\d+)-[A-Za-z0-9]{6}$`).exec(name);
    if (!m || Number(m[1]) === process.pid || processAlive(Number(m[1]))) continue;
    removeTree(path.join(dir, name));
  }
}

/**
 * A private directory of this run under `parent` (0700), named by its pid; those of the same
 * prefix that a killed run left (a drill's restored secrets, a bundle read from R2) go first.
 */
function runDir(parent: string, prefix: string): string {
  ensurePrivateDir(parent);
  removeStaleRunDirs(parent, prefix);
  const dir = fs.mkdtempSync(path.join(parent, `${prefix}${process.pid}-`));
  fs.chmodSync(dir, 0o700);
  return dir;
}

// ---------------------------------------------------------------------------------------------
// The source, checked

export interface SourceOptions {
  where: FromWhere;
  backupDir: string;
  stateDir: string;
  /** The config kinds to restore (after --only). */
  kinds: string[];
  /** Whether the image is to be restored: which one, and whether Mello holds its bytes. */
  image: boolean;
  /** Verda, for --from sfs. */
  host: Host;
  sfsBackupDir: string;
  /** The cache bucket: --from r2, and the image's identity when no manifest is read. */
  cacheBucket?: () => Backend;
  /** AGE_IDENTITY_FILE: decrypts an age-encrypted R2 bundle (--from r2). */
  ageIdentityFile?: string;
  source: RestoreSource;
  /** Judges the restore points of BACKUP_DIR (the one rule: lib/restore-point.ts). */
  judge: () => PointJudge;
  /** SFS_MOUNT: --from sfs reads SFS (lib/sfs.ts). */
  sfsMount?: string;
}

const sha256Of = (text: string) => crypto.createHash('sha256').update(text).digest('hex');

/** Why a file on Mello is not the manifest's artifact, or undefined when it is. */
async function artifactProblem(file: string, bytes: number, sha256: string, signal: AbortSignal) {
  const name = path.basename(file);
  if (!isRegularFile(file))
    return `missing: ${name} (${fs.existsSync(file) ? 'not a regular file' : 'not in BACKUP_DIR'})`;
  const st = fs.lstatSync(file, { bigint: true });
  if (Number(st.size) !== bytes) return `damaged: ${name} has ${st.size} bytes, the manifest says ${bytes}`;
  let got: string;
  try {
    got = await hashFile(file, signal);
  } catch (e) {
    if (signal.aborted) throw e;
    return `unreadable: ${name} (${errorText(e)})`;
  }
  return got === sha256 ? undefined : `damaged: ${name}: its sha256 is not the manifest's`;
}

/**
 * The entries of a kind's archive on Mello, read through its layout (as the unpack will read it),
 * or why it is not to be unpacked: an entry outside the layout, or a damaged archive.
 */
async function entriesOf(file: string, kind: string, signal: AbortSignal): Promise<number | string> {
  try {
    return (await checkArchiveFile(file, kind, signal)).entries;
  } catch (e) {
    if (signal.aborted) throw e;
    if (e instanceof LayoutError) return `refused: ${path.basename(file)} holds ${e.message}`;
    return `damaged: ${path.basename(file)} does not list as a whole archive (${errorText(e)})`;
  }
}

/**
 * Step 1: picks the source and checks every artifact that is to be restored: against the
 * manifest's bytes and sha256, and that each archive lists whole. Any problem is a failure naming
 * the file, and then no step after it restores anything.
 */
export function sourceStep(o: SourceOptions): Step {
  const w = o.where;
  const moves =
    w.from === 'sfs'
      ? `${o.host.label}:${o.sfsBackupDir}/KIND-*.tar.gz (the newest copy of each kind)`
      : w.from === 'r2'
        ? `r2 cache bucket: ${BUNDLE_KEY} → a private directory on Mello`
        : `${o.backupDir}/${w.stamp ? `manifest-${w.stamp}.json` : 'manifest-*.json (the newest complete)'}`;
  return {
    name: 'Backup to restore from',
    moves,
    async run(ctx) {
      const failures: string[] = [];
      const warnings: string[] = [];
      if (w.from === 'manifest') await fromManifest(o, w.stamp, ctx, failures, warnings);
      else if (w.from === 'sfs') await fromSfs(o, ctx, failures);
      else await fromR2(o, ctx, failures, warnings);
      const s = o.source;
      if (o.image && !s.image && !s.absent.has(IMAGE_KIND))
        s.absent.set(IMAGE_KIND, `${s.label} names no worker image`);
      if (s.image && !s.image.melloFile && w.from === 'manifest') {
        warnings.push(
          `Mello's ${IMAGE_FILE} is not the image ${s.image.recordedIn} records: it must come from the SFS copy or R2`,
        );
      }
      s.checked = failures.length === 0;
      const kinds = [...s.archives.keys()];
      const data = {
        source: s.label,
        archives: Object.fromEntries([...s.archives].map(([k, a]) => [k, a.name])),
        image: s.image,
      };
      if (failures.length) {
        return { summary: `${s.label} does not check out: nothing is restored`, failures, warnings, data };
      }
      const checked = [
        ...(o.kinds.length ? [`${kinds.length} archives checked`] : []),
        ...(s.image ? [`image ${shortId(s.image.imageId)}${s.image.melloFile ? ' (on Mello, checked)' : ''}`] : []),
      ];
      return { summary: `${s.label}${checked.length ? `: ${checked.join(', ')}` : ''}`, warnings, data };
    },
  };
}

export const shortId = (id: string) => id.replace(/^sha256:/, '').slice(0, 12);

async function fromManifest(
  o: SourceOptions,
  stamp: string | undefined,
  ctx: StepContext,
  failures: string[],
  warnings: string[],
) {
  const s = o.source;
  const points = listPoints(o.backupDir);
  const judge = o.judge();
  let chosen: RestorePoint | undefined;
  if (stamp) {
    chosen = points.find((p) => p.stamp === stamp);
    if (!chosen) throw new Error(`no manifest-${stamp}.json in ${o.backupDir}${pointsList(points)}`);
    if (!chosen.manifest) throw new Error(`${chosen.name} cannot be read (${chosen.readError})`);
  } else {
    // The newest whole restore point; what R2 could not confirm (unknown) is not held against it.
    for (const p of points) {
      const j = await judge.judge(p);
      if (j.state !== 'broken' && p.manifest) {
        chosen = p;
        if (j.state === 'unknown') warnings.push(`${p.name}: ${j.why.join('; ')}`);
        break;
      }
      warnings.push(`${p.name} is passed over: not a whole restore point (${j.why.join('; ')})`);
    }
    if (!chosen) throw new Error(`no whole restore point in ${o.backupDir}${pointsList(points)}`);
  }
  const m = chosen.manifest!;
  s.manifest = { file: chosen.file, manifest: m };
  s.label = chosen.name;
  for (const kind of o.kinds) {
    const a = m.artifacts.find((x) => datedPattern(kind, 'tar.gz').test(x.name));
    if (!a) {
      s.absent.set(kind, `${s.label} holds no ${kind} archive (its source was missing on Verda when it ran)`);
      continue;
    }
    const file = path.join(o.backupDir, a.name);
    const problem = await artifactProblem(file, a.bytes, a.sha256, ctx.signal);
    const entries = problem ?? (await entriesOf(file, kind, ctx.signal));
    if (typeof entries === 'string') failures.push(entries);
    else s.archives.set(kind, { name: a.name, melloFile: file, sha256: a.sha256, bytes: a.bytes, entries });
  }
  if (stamp && !failures.length) {
    // Chosen by the admin: restored as far as it checks out, whole or not (after the local checks:
    // a point that does not check out asks nothing of R2).
    const j = await judge.judge(chosen);
    if (j.state !== 'whole')
      warnings.push(
        `${chosen.name} is not a whole restore point (${j.why.join('; ')}): what of it checks out is restored`,
      );
  }
  if (o.kinds.includes('tailscale-identity')) {
    // Not dated: a later run rewrote it when the IP changed. Only compared with, never restored.
    const ip = m.artifacts.find((a) => a.name === 'tailscale-ip.txt');
    const file = path.join(o.backupDir, 'tailscale-ip.txt');
    const text = ip && isRegularFile(file) ? readRegularFileSync(file).toString('utf8') : undefined;
    if (ip && text !== undefined && sha256Of(text) === ip.sha256) s.tailscaleIp = text.trim();
    else if (ip)
      warnings.push(`tailscale-ip.txt is no longer the one ${s.label} recorded: the Tailscale IP will not be compared`);
  }
  s.objectsFrom.push({ ...m });
  const older = points.filter((p) => p.stamp <= chosen.stamp && p.manifest);
  // The models: those of the chosen run, or of the newest full run before it that completed (a
  // --quick run sends none). They are what a restore must bring back: R2 is checked against them,
  // not they against R2.
  if (m.mode !== 'full') {
    const full = older.find((p) => p.manifest!.mode === 'full' && p.manifest!.complete);
    // Its models only: its config bundle is superseded by the chosen run's.
    if (full) s.objectsFrom.push({ ...full.manifest!, r2: full.manifest!.r2.filter((r) => !isBundleKey(r.key)) });
  }
  for (const from of s.objectsFrom) {
    from.r2 = from.r2.filter((r) => r.key !== IMAGE_FILE); // the image is judged by any copy that holds it
    for (const r of from.r2) if (!isBundleKey(r.key)) s.models.set(r.key, { record: r, recordedIn: from.timestamp });
  }
  if (!o.image) return;
  // Every image the backups record, newest first, complete runs or not (with --from T: up to T).
  for (const p of stamp ? older : points.filter((x) => x.manifest)) {
    const image = recordedImage(p);
    if (image && !s.images.some((i) => i.imageId === image.imageId && i.sha256 === image.sha256)) s.images.push(image);
  }
  if (!s.images.length) {
    s.absent.set(
      IMAGE_KIND,
      `no backup in ${o.backupDir}${stamp ? ` up to ${s.label}` : ''} records the worker image (--quick runs save none)`,
    );
    return;
  }
  await adoptMelloImage(o, s.images, ctx.signal);
}

/** The restore points there are, for a message: newest first, whole or not. */
function pointsList(points: RestorePoint[]): string {
  if (!points.length) return ' (it holds no manifest-*.json: no restore point at all)';
  const shown = points.slice(0, 10).map((p) => p.stamp);
  return ` (restore points there: ${shown.join(', ')}${points.length > 10 ? `, and ${points.length - 10} older` : ''}; --list says which are whole)`;
}

/** Mello's worker-image.tar.gz, for the image whose bytes it holds (hashed once, by the backup's hash cache). */
async function adoptMelloImage(o: SourceOptions, images: ImageRef[], signal: AbortSignal) {
  const file = path.join(o.backupDir, IMAGE_FILE);
  const local = await melloImageDigest(file, o.stateDir, signal).catch((e) => {
    if (signal.aborted) throw e;
    return undefined; // unreadable: the image comes from elsewhere
  });
  if (local?.cacheWarning) addNotice(local.cacheWarning);
  for (const image of images) if (local?.sha256 === image.sha256 && local.bytes === image.bytes) image.melloFile = file;
}

/** An SFS copy is a config archive of a few KiB: one far larger is not read to Mello. */
const SFS_COPY_LIMIT = 64 * 1024 * 1024;

/** A regular file on the host read into `local` on Mello (0600, through a temporary name), at most `limit` bytes. */
async function fetchFile(host: Host, remote: string, local: string, limit: number, signal: AbortSignal) {
  const raw = new PassThrough({ highWaterMark: 1 << 20 });
  let bytes = 0;
  const bounded = tap((chunk) =>
    (bytes += chunk.length) > limit ? new Error(`more than ${humanSize(limit)}: not a config archive`) : undefined,
  );
  const writing = writeStreamAtomic(local, raw.pipe(bounded), 0o600, signal);
  writing.catch(() => {});
  raw.on('error', (e) => bounded.destroy(e));
  bounded.on('error', (e) => raw.destroy(e));
  const r = await host.$({
    sudo: true,
    signal,
    into: raw,
    nothrow: true,
  })`sh -c ${program('cat-regular')} cat-regular ${remote}`.catch(async (e) => {
    await writing.catch(() => {});
    throw e;
  });
  if (r.code !== 0) {
    const why = new Error(said(r.stderr, 1));
    raw.destroy(why);
    await writing.catch(() => {});
    throw why;
  }
  raw.end();
  await writing;
}

async function fromSfs(o: SourceOptions, ctx: StepContext, failures: string[]) {
  const s = o.source;
  s.label = `the newest SFS copies in ${o.host.label}:${o.sfsBackupDir}`;
  await requireSfs(o.host, o.sfsMount, o.sfsBackupDir, 'restoring from the copies in', ctx.signal);
  const listed = await o.host.$({
    sudo: true,
    signal: ctx.signal,
    nothrow: true,
  })`sh -c ${program('sfs-list')} sfs-list ${o.sfsBackupDir}`;
  if (listed.code === 3)
    throw new Error(`${o.sfsBackupDir} is not a directory on ${o.host.label}: no SFS copies to restore from`);
  if (listed.code !== 0) throw new Error(`cannot list ${o.sfsBackupDir} on ${o.host.label}: ${said(listed.stderr)}`);
  const names = listed.stdout.split('\0').filter(Boolean);
  for (const kind of o.kinds) {
    if (!CRON_KINDS.includes(kind)) {
      s.absent.set(
        kind,
        `backup-cron keeps no ${kind} copy on SFS (only ${CRON_KINDS.join(', ')}): restore it from BACKUP_DIR`,
      );
      continue;
    }
    const newest = datedCopies(names, kind, 'tar.gz')[0];
    if (!newest) {
      s.absent.set(kind, `no ${kind} copy in ${o.sfsBackupDir} on ${o.host.label}`);
      continue;
    }
    // What SFS holds was written on Verda: it is read to Mello and checked here, like any archive
    // from Verda, before anything is unpacked (no manifest records SFS copies).
    const file = path.join(o.sfsBackupDir, newest);
    const local = path.join(s.tempDir(o.stateDir, 'restore-sfs-'), newest);
    try {
      await fetchFile(o.host, file, local, SFS_COPY_LIMIT, ctx.signal);
    } catch (e) {
      if (ctx.signal.aborted) throw e;
      failures.push(`cannot read ${file} on ${o.host.label}: ${errorText(e)}`);
      continue;
    }
    const entries = await entriesOf(local, kind, ctx.signal);
    if (typeof entries === 'string') failures.push(`${o.host.label}:${file}: ${entries}`);
    else s.archives.set(kind, { name: newest, melloFile: local, entries, from: `${o.host.label}:${file}` });
  }
  // Nothing at all of what was asked for is no restore (a wrong SFS_BACKUP_DIR, an empty SFS).
  const wanted = o.kinds.filter((k) => CRON_KINDS.includes(k));
  if (wanted.length && !wanted.some((k) => s.archives.has(k)) && !failures.length)
    failures.push(
      `no copy of ${wanted.join(', ')} in ${o.sfsBackupDir} on ${o.host.label}: nothing to restore from SFS`,
    );
  if (o.image) await imageFromR2(o, ctx.signal);
}

async function fromR2(o: SourceOptions, ctx: StepContext, failures: string[], warnings: string[]) {
  const s = o.source;
  const cacheBucket = o.cacheBucket!();
  s.label = `${cacheBucket.name}/${BUNDLE_KEY}`;
  const bundle = await readR2Bundle(cacheBucket, o.stateDir, ctx.signal, o.ageIdentityFile);
  s.label = bundle.label;
  s.tempDirs.push(bundle.dir);
  warnings.push(...bundle.warnings);
  for (const kind of o.kinds) {
    const newest = datedCopies(bundle.names, kind, 'tar.gz')[0];
    if (!newest) {
      s.absent.set(kind, `${s.label} holds no ${kind} archive`);
      continue;
    }
    const file = path.join(bundle.dir, newest);
    const entries = await entriesOf(file, kind, ctx.signal);
    if (typeof entries === 'string') failures.push(`${s.label}: ${entries}`);
    else s.archives.set(kind, { name: newest, melloFile: file, entries });
  }
  if (bundle.names.includes('tailscale-ip.txt'))
    s.tailscaleIp = fs.readFileSync(path.join(bundle.dir, 'tailscale-ip.txt'), 'utf8').trim();
  if (o.image) await imageFromR2(o, ctx.signal);
}

/** Without a manifest, the image to have is the one the cache bucket holds (its `image-id` and `sha256`). */
async function imageFromR2(o: SourceOptions, signal: AbortSignal) {
  const cacheBucket = o.cacheBucket!();
  const head = await cacheBucket.head(IMAGE_FILE, signal);
  const imageId = head?.metadata['image-id'];
  const sha256 = head?.metadata.sha256;
  if (!head || !imageId || !sha256) {
    const why = head ? 'has no image-id or sha256 metadata' : 'does not exist';
    o.source.absent.set(IMAGE_KIND, `${cacheBucket.name}/${IMAGE_FILE} ${why}: no image to restore`);
    return;
  }
  o.source.images.push({ imageId, sha256, bytes: head.size, recordedIn: `${cacheBucket.name}/${IMAGE_FILE}` });
  await adoptMelloImage(o, o.source.images, signal);
}

/**
 * The newest bundle in the cache bucket: the newest dated copy (`verda-config-backups/`), plain
 * or age-encrypted, as the latest key of either kind may be older (encryption turned on or off);
 * the plain latest key when there is no dated copy.
 */
async function newestBundleKey(cacheBucket: Backend, signal: AbortSignal): Promise<string> {
  return (await listBundles(cacheBucket, signal))[0]?.key ?? BUNDLE_KEY;
}

/** A member of the R2 bundle: one flat, plain name (what bundleFiles writes). */
const BUNDLE_MEMBER = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/**
 * The R2 config bundle, read into a private directory on Mello (0700, members 0600) and checked
 * against its recorded sha256. Every way the bundle is read is here, so that decrypting an
 * age-encrypted one is a change to this function alone.
 */
async function readR2Bundle(
  cacheBucket: Backend,
  stateDir: string,
  signal: AbortSignal,
  ageIdentityFile?: string,
): Promise<{ dir: string; names: string[]; warnings: string[]; label: string }> {
  const key = await newestBundleKey(cacheBucket, signal);
  const label = `${cacheBucket.name}/${key}`;
  const head = await cacheBucket.head(key, signal);
  if (!head) throw new Error(`${label} does not exist: nothing to restore from R2`);
  // An encrypted bundle (AGE_RECIPIENTS on Mello) needs the identity before anything is read.
  const identity = isEncryptedKey(key) ? requireIdentityFile(ageIdentityFile, `to restore from ${label}`) : undefined;
  const dir = runDir(stateDir, 'restore-r2-');
  const warnings: string[] = [];
  try {
    // The object as stored (the ciphertext, when encrypted) is checked against its sha256 first.
    const stored = path.join(dir, identity ? '.bundle.tar.gz.age' : '.bundle.tar.gz');
    const written = await writeStreamAtomic(stored, await cacheBucket.get(key, signal), 0o600, signal);
    if (written.bytes !== head.size)
      throw new Error(`${label}: read ${written.bytes} bytes, the object has ${head.size}`);
    if (!head.metadata.sha256)
      warnings.push(`${label} has no sha256 metadata: its archives are checked by listing alone`);
    else if (written.sha256 !== head.metadata.sha256) {
      throw new Error(`damaged: ${label}: its bytes' sha256 is not the one recorded with it`);
    }
    const file = path.join(dir, '.bundle.tar.gz');
    if (identity) {
      const plain = await decryptStream(identity, (await openRegular(stored)).handle.createReadStream()).catch((e) => {
        throw new Error(`${label} cannot be decrypted: ${errorText(e)}`);
      });
      await writeStreamAtomic(file, plain, 0o600, signal);
      fs.rmSync(stored);
    }
    const names: string[] = [];
    const extract = tar.extract();
    const reading = pipeline((await openRegular(file)).handle.createReadStream(), zlib.createGunzip(), extract, {
      signal,
    });
    // Awaited below; when the loop throws first (a bad member, a full disk), its rejection is
    // that error's echo and must not end the process unhandled.
    reading.catch(() => {});
    for await (const entry of extract as AsyncIterable<Readable & { header: tar.Header }>) {
      const name = entry.header.name;
      if (entry.header.type !== 'file' || !BUNDLE_MEMBER.test(name) || names.includes(name)) {
        throw new Error(`${label} holds ${JSON.stringify(name)}, which is not one of its artifacts: not read`);
      }
      await writeStreamAtomic(path.join(dir, name), entry, 0o600, signal);
      names.push(name);
    }
    await reading;
    fs.rmSync(file);
    return { dir, names, warnings, label };
  } catch (e) {
    removeTree(dir);
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Config archives: services, unpacking, the drill's comparison

type ServiceAction = [verb: 'stop' | 'start' | 'restart' | 'reload', unit: string];

/** What restoring a kind does to its service: the SPEC's order. */
const SERVICES: Record<string, { before?: ServiceAction[]; after?: ServiceAction[] }> = {
  'tailscale-identity': { before: [['stop', 'tailscaled']], after: [['start', 'tailscaled']] },
  'ssh-host-keys': { after: [['restart', 'ssh']] },
  fail2ban: { after: [['reload', 'fail2ban']] },
  ufw: { after: [['reload', 'ufw']] },
};

/** systemctl's exit status for a unit that is not there (LSB: "program is not installed"). */
const UNIT_NOT_INSTALLED = 5;

/** How long starting a stopped service again may take once the run is failing or interrupted. */
const RESTART_MS = 30_000;

/**
 * The services on Verda (VERDA_SYSTEMCTL, through VERDA_SUDO), and what this restore did to each.
 * A service the restore stopped is started again whatever happens after (a failure, a signal, a
 * lost connection: `startStopped` runs at the run's end with a signal of its own), and the
 * summary says the state each one was left in.
 */
export class Services {
  private readonly state = new Map<string, string>();
  private readonly stopped = new Set<string>();
  constructor(
    readonly host: Host,
    readonly systemctl: string[],
  ) {}

  async act([verb, unit]: ServiceAction, signal: AbortSignal) {
    const r = await this.host.$({ sudo: true, signal, nothrow: true })`${this.systemctl} ${verb} ${unit}`;
    const result = {
      ok: r.code === 0,
      missing: r.code === UNIT_NOT_INSTALLED,
      said: said(r.stderr, 2),
      what: `${this.systemctl.join(' ')} ${verb} ${unit}`,
    };
    if (result.missing) this.state.set(unit, 'not installed');
    else if (verb === 'stop' && result.ok) {
      this.stopped.add(unit);
      this.state.set(unit, 'STOPPED');
    } else if (verb !== 'stop') {
      if (result.ok) this.stopped.delete(unit);
      const done = { start: 'started', restart: 'restarted', reload: 'reloaded' }[verb];
      this.state.set(
        unit,
        result.ok ? done : `${verb} FAILED (${said})${this.stopped.has(unit) ? ', left STOPPED' : ''}`,
      );
    }
    return result;
  }

  /** Starts every service this run stopped and did not start again. */
  async startStopped() {
    for (const unit of [...this.stopped]) {
      await this.act(['start', unit], AbortSignal.timeout(RESTART_MS)).catch((e) =>
        this.state.set(unit, `STOPPED: it could not be started again (${errorText(e)})`),
      );
    }
  }

  /** The state each service touched was left in: `tailscaled started, ssh restarted`. */
  report(): string[] {
    return this.state.size ? [`services: ${[...this.state].map(([u, st]) => `${u} ${st}`).join(', ')}`] : [];
  }
}

/**
 * Unpacks an archive on Mello into root/base on the host: streamed over the connection through
 * its kind's guard (the layout checked again as it passes, what home-dev may not hold left out,
 * the drill's budget counted) and its bytes hashed as they pass: they must be the ones checked.
 */
async function unpackOn(
  host: Host,
  ref: ArchiveRef,
  kind: string,
  into: { root: string; base: string },
  opts: { sudo: boolean; signal: AbortSignal; budget?: ByteBudget },
): Promise<{ bytes: number; dropped: string[] }> {
  let bytes = 0;
  const { handle } = await openRegular(ref.melloFile);
  const hash = crypto.createHash('sha256');
  const seen = tap((chunk) => void ((bytes += chunk.length), hash.update(chunk)));
  const guard = new TarGuard(kind, opts.budget);
  const file = handle.createReadStream({ highWaterMark: 1 << 20 });
  // gzip level 1 again for the wire: the guard reads plain tar, tar there reads gzip.
  const stdin = chain(file, seen, zlib.createGunzip(), guard, zlib.createGzip({ level: 1 }), () => {});
  const r = await host.$({
    sudo: opts.sudo,
    signal: opts.signal,
    stdin,
    nothrow: true,
  })`env LC_ALL=C sh -c ${program('unpack')} unpack ${into.root} ${into.base}`;
  if (r.code === 0 && ref.sha256 && hash.digest('hex') !== ref.sha256) {
    throw new Error(`${ref.name} changed on Mello while it was sent: what was unpacked is not what was checked`);
  }
  if (r.code !== 0) {
    const dest = path.join(into.root, into.base);
    throw new Error(
      `tar on ${host.label} could not unpack ${ref.name} into ${dest} (exit ${r.code}): ${said(r.stderr)}`,
    );
  }
  return { bytes, dropped: guard.result.dropped };
}

/** `tailscale ip -4` once tailscaled has started: it may take a few seconds to come up. */
async function tailscaleIp(host: Host, signal: AbortSignal): Promise<{ ip?: string; why?: string }> {
  let last = '';
  for (let attempt = 0; attempt < 10; attempt++) {
    if (attempt) await sleep(1000, signal);
    // A hung tailscale is no address, after 5 s, not the 10 minutes a command may stay silent.
    const r = await host.$({
      signal,
      idleTimeoutMs: 5000,
      nothrow: true,
    })`sh -c ${program('tailscale-ip')} tailscale-ip`.catch((e) => {
      if (e instanceof CommandTimeout) return undefined;
      throw e;
    });
    if (!r) return { why: `tailscale ip -4 did not answer within 5 s on ${host.label}` };
    if (r.code === 127) return { why: `tailscale is not installed on ${host.label}` };
    const ip = r.code === 0 ? r.stdout.trim().split('\n')[0] : '';
    if (ip) return { ip };
    last = said(r.stderr, 1);
  }
  return { why: `tailscale ip -4 gave no address within 10 s (${last})` };
}

/** Compares Verda's Tailscale IP after the restore with the recorded one: a different one is said loudly. */
async function compareTailscaleIp(
  host: Host,
  recorded: string | undefined,
  signal: AbortSignal,
  warnings: string[],
): Promise<string> {
  const now = await tailscaleIp(host, signal);
  if (!now.ip) {
    warnings.push(`Tailscale IP not compared: ${now.why}`);
    return '';
  }
  if (!recorded || recorded === 'unknown') {
    warnings.push(
      `Tailscale IP is ${now.ip}; the backup recorded none (tailscale-ip.txt: ${recorded ?? 'absent'}): ` +
        'not compared',
    );
    return `, Tailscale IP ${now.ip}`;
  }
  if (now.ip !== recorded) {
    const loud =
      `TAILSCALE IP CHANGED: Verda came back as ${now.ip}, the backup recorded ${recorded}. ` +
      "The platform's fixed Tailscale IP is lost: check /var/lib/tailscale/tailscaled.state, " +
      `or update every place that uses ${recorded}`;
    warnings.push(loud);
    addNotice(loud);
    return `, Tailscale IP ${now.ip} (NOT the recorded ${recorded})`;
  }
  return `, Tailscale IP ${now.ip} as recorded`;
}

export interface UnpackStepOptions {
  host: Host;
  spec: ArchiveSpec;
  source: RestoreSource;
  /** The root restored under (--root; the drill's fresh directory for the kind); without one, `/`. */
  root?: (kind: string) => string;
  /** Services controlled around the unpack; none with --root or in the drill. */
  services?: Services;
  skipReason?: string;
  /** The drill: compare every restored entry with its archive. */
  compare?: boolean;
  /** The drill's DRILL_MAX_BYTES, shared by its kinds, counted as they unpack. */
  budget?: ByteBudget;
}

/** One config archive restored: services stopped, unpacked by tar there, services started or reloaded. */
export function unpackStep(o: UnpackStepOptions): Step {
  const { spec, host } = o;
  const rootOf = () => o.root?.(spec.kind) ?? '/';
  const actions = o.services ? SERVICES[spec.kind] : undefined;
  const around = [
    ...(actions?.before ?? []).map(([v, u]) => `${v} ${u} before`),
    ...(actions?.after ?? []).map(([v, u]) => `${v} ${u} after`),
  ];
  const services = around.length ? ` (${around.join(', ')})` : '';
  return {
    name: spec.title,
    moves: `${spec.kind}-*.tar.gz → ${host.label}:${o.root ? `ROOT${spec.base}` : spec.base}${services}`,
    skipReason: o.skipReason,
    async run(ctx) {
      if (!o.source.checked) return notChecked();
      const ref = o.source.archives.get(spec.kind);
      if (!ref)
        return {
          status: 'skipped',
          summary: 'nothing to restore',
          warnings: [o.source.absent.get(spec.kind) ?? `no ${spec.kind} archive`],
        };
      const root = rootOf();
      const into = path.join(root, spec.base);
      const from = ref.from ?? ref.name;
      if (ctx.dryRun) {
        const services = around.length ? `; would ${around.join(', ')}` : '';
        return { summary: `would unpack ${from} (${ref.entries} entries) into ${host.label}:${into}${services}` };
      }
      const warnings: string[] = [];
      const failures: string[] = [];
      const serviceFailed = (r: Awaited<ReturnType<Services['act']>>) => {
        if (r.missing)
          warnings.push(
            `${r.what}: no such unit on ${host.label} (${r.said}); the files are in place for when it is installed`,
          );
        return !r.missing;
      };
      for (const action of actions?.before ?? []) {
        const r = await o.services!.act(action, ctx.signal);
        // A running tailscaled would write its own state over the one restored.
        if (!r.ok && serviceFailed(r)) throw new Error(`${r.what} failed (${r.said}): ${ref.name} not unpacked`);
      }
      let unpacked;
      try {
        unpacked = await unpackOn(
          host,
          ref,
          spec.kind,
          { root, base: spec.base },
          { sudo: spec.sudo, signal: ctx.signal, budget: o.budget },
        ).catch((e) => {
          if (e instanceof LayoutError) throw new LayoutError(`${ref.name} holds ${e.message}: refused`);
          throw e;
        });
      } catch (e) {
        // Not unpacked (or not whole): what the restore stopped is started again, nothing else
        // is restarted over files that may be half there.
        await o.services?.startStopped();
        throw e;
      }
      for (const action of actions?.after ?? []) {
        const r = await o.services!.act(action, ctx.signal);
        if (!r.ok && serviceFailed(r)) failures.push(`${r.what} failed: ${r.said}`);
      }
      // The host keys back, ssh restarted: Verda must present the key the admin's known_hosts trusts.
      if (spec.kind === 'ssh-host-keys' && o.services && host.checkHostKey) {
        const problem = await host.checkHostKey();
        if (problem) failures.push(problem);
        else warnings.push(`${host.label} presents the host key your known_hosts trusts again`);
      }
      const { bytes, dropped } = unpacked;
      warnings.push(...dropped);
      let ip = '';
      if (spec.kind === 'tailscale-identity' && o.services)
        ip = await compareTailscaleIp(host, o.source.tailscaleIp, ctx.signal, warnings);
      let compared = '';
      if (o.compare) {
        const c = await compareWithArchive(ref.melloFile, into, ctx.signal);
        failures.push(...c.failures.map((f) => `${ref.name}: ${f}`));
        if (!c.owners)
          warnings.push('owners not compared: the drill does not run as root, so tar could not restore them');
        compared = `: ${c.entries - c.failures.length} of ${c.entries} entries identical to the archive`;
      }
      const size = bytes ? ` (${humanSize(bytes)})` : '';
      return {
        summary: `${from}${size} unpacked into ${into}${compared}${ip}`,
        // The drill moves nothing anywhere: its bytes are not a restore's.
        bytes: o.compare ? undefined : bytes,
        warnings,
        failures,
        data: { archive: ref.name, dest: into },
      };
    },
  };
}

/** Local user and group IDs by name, as GNU tar maps an archive's owner names when it restores as root. */
function localIds(file: string): Map<string, number> {
  const ids = new Map<string, number>();
  try {
    for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
      const [name, , id] = line.split(':');
      if (name && /^\d+$/.test(id ?? '')) ids.set(name, Number(id));
    }
  } catch {
    /* no such file: numeric IDs only */
  }
  return ids;
}

/**
 * Compares what tar restored under `dest` with the archive, entry by entry: type, contents
 * (sha256), mode, mtime, symlink target, and, as root, owner. Returns the differences, each
 * naming the entry.
 */
export async function compareWithArchive(
  gzFile: string,
  dest: string,
  signal: AbortSignal,
): Promise<{ entries: number; failures: string[]; owners: boolean }> {
  const owners = process.geteuid?.() === 0;
  const users = localIds('/etc/passwd');
  const groups = localIds('/etc/group');
  const failures: string[] = [];
  let entries = 0;
  const extract = tar.extract();
  const reading = pipeline(
    (await openRegular(gzFile)).handle.createReadStream({ highWaterMark: 1 << 20 }),
    zlib.createGunzip(),
    extract,
    { signal },
  );
  reading.catch(() => {}); // awaited below; an error also ends the loop
  for await (const entry of extract as AsyncIterable<Readable & { header: tar.Header }>) {
    const h = entry.header;
    // Left out by the guard (lib/layout.ts): never restored, so not compared.
    if (h.type === 'character-device' || h.type === 'block-device' || h.type === 'fifo') {
      entry.resume();
      continue;
    }
    entries++;
    const at = path.join(dest, h.name);
    const differs = (what: string) => failures.push(`${printable(h.name)}: ${what}`);
    let st: fs.Stats | undefined;
    try {
      st = fs.lstatSync(at);
    } catch {
      differs('not restored');
    }
    const contents = crypto.createHash('sha256');
    for await (const chunk of entry as AsyncIterable<Buffer>) contents.update(chunk);
    if (!st) continue;
    const type = h.type === 'contiguous-file' ? 'file' : h.type;
    const got = st.isFile() ? 'file' : st.isDirectory() ? 'directory' : st.isSymbolicLink() ? 'symlink' : 'other';
    if (type === 'link') {
      if (st.ino !== fs.lstatSync(path.join(dest, h.linkname ?? '')).ino)
        differs(`not a hard link to ${printable(h.linkname ?? '')}`);
      continue;
    }
    if (type !== got) {
      differs(`restored as a ${got}, the archive holds a ${type}`);
      continue;
    }
    if (type === 'symlink') {
      if (fs.readlinkSync(at) !== h.linkname)
        differs(`links to ${printable(fs.readlinkSync(at))}, not ${printable(h.linkname ?? '')}`);
      continue;
    }
    if (type === 'file' && (await hashFile(at, signal)) !== contents.digest('hex')) differs('contents differ');
    const mode = (h.mode ?? 0) & 0o7777;
    if ((st.mode & 0o7777) !== mode)
      differs(`mode ${(st.mode & 0o7777).toString(8)}, the archive's ${mode.toString(8)}`);
    const mtime = Math.floor((h.mtime?.getTime() ?? 0) / 1000);
    if (Math.floor(st.mtimeMs / 1000) !== mtime)
      differs(`mtime ${new Date(st.mtimeMs).toISOString()}, the archive's ${h.mtime?.toISOString()}`);
    if (owners) {
      const uid = (h.uname ? users.get(h.uname) : undefined) ?? h.uid;
      const gid = (h.gname ? groups.get(h.gname) : undefined) ?? h.gid;
      if (st.uid !== uid || st.gid !== gid) differs(`owner ${st.uid}:${st.gid}, the archive's ${uid}:${gid}`);
    }
  }
  await reading;
  return { entries, failures, owners };
}

// ---------------------------------------------------------------------------------------------
// The drill's and --verify's other steps

/**
 * The drill's temporary directory on Mello: private, made on first use, removed by the verdict (or
 * at close). Each kind is unpacked into a fresh directory of its own in it, so that a symlink one
 * archive restores can never be the way into another's destination.
 */
export class TempRoot {
  private dir?: string;
  constructor(private readonly parent: string) {}
  get(kind: string): string {
    this.dir ??= runDir(this.parent, 'drill-');
    const own = path.join(this.dir, kind);
    fs.mkdirSync(own, { mode: 0o700 });
    return own;
  }
  remove() {
    if (this.dir) removeTree(this.dir);
    this.dir = undefined;
  }
}

/**
 * Each R2 object the manifest names: there with its size and `sha256` metadata (with `deep`,
 * its bytes read back and hashed). An object without metadata (a bash-era upload adopted by its
 * ETag) is checked by size, or with `deep` by its bytes.
 */
export function objectsStep(o: {
  source: RestoreSource;
  backends: () => Map<string, Backend>;
  deep: boolean;
  /** The drill: an age-encrypted bundle is decrypted (AGE_IDENTITY_FILE), as a restore would. */
  decrypt?: boolean;
  ageIdentityFile?: string;
}): Step {
  return {
    name: `R2 objects of the backup${o.deep ? ' (reading every byte back)' : ''}`,
    moves: `the objects its manifest names (and, after a --quick run, the last full run's) → R2: size and sha256`,
    async run(ctx) {
      if (!o.source.checked || !o.source.objectsFrom.length) return notChecked();
      // Each object once, as the newest of those manifests records it.
      const byKey = new Map<string, R2Record>();
      for (const r of o.source.objectsFrom.flatMap((m) => m.r2)) {
        const id = `${r.bucket}/${r.key}`;
        byKey.set(id, byKey.get(id) ?? r);
      }
      const records = [...byKey.values()];
      const found = await checkObjects(records, o.backends(), { ...o, signal: ctx.signal });
      const present = records.length - found.failures.length;
      return {
        summary: `${present} of ${records.length} objects present with their size and sha256${decryptedNote(found)}`,
        failures: found.failures,
        warnings: sizeOnlyWarnings(found),
        data: { objects: records.length },
      };
    },
  };
}

/** The drill's last step: one verdict line, and the temporary root removed. */
export function verdictStep(o: { source: RestoreSource; root: TempRoot }): Step {
  return {
    name: 'Drill verdict',
    moves: 'remove the temporary root',
    async run(ctx) {
      o.root.remove();
      const failed = failedBefore(ctx);
      if (failed.length) {
        const what = failed.flatMap((r) => (r.failures.length ? r.failures : [r.error ?? r.summary ?? r.name]));
        const shown = what.slice(0, 5).join('; ') + (what.length > 5 ? `; and ${what.length - 5} more` : '');
        throw new Error(`drill FAILED: ${o.source.label || 'the backup'} would not restore: ${shown}`);
      }
      const objects = ctx.earlier.find((r) => r.data?.objects !== undefined)?.data?.objects;
      const archives = o.source.archives.size;
      return {
        summary:
          `drill passed: ${o.source.label} restores whole ` +
          `(${archives} archives identical on restore, ${objects ?? 0} R2 objects in place)`,
      };
    },
  };
}
