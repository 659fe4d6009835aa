// Restore points. A manifest is a restore point, and this file is the one place that says whether
// it is whole, and if not why: each dated config artifact it names in BACKUP_DIR with its recorded
// sha256, its dated config bundle in R2, the models objects it names in the models bucket, and,
// when it records the worker image, a copy of that image with the recorded sha256 that can still
// be had (Mello's or the cache bucket's: what Mello can see). A failed or interrupted run's point
// is not whole. What cannot be checked (R2 unreachable) is "unknown": rotation keeps it, --status
// flags it. Rotation, --status, --list, --verify, the drill and the restore all ask here.
import fs from 'node:fs';
import path from 'node:path';
import { BUNDLE_KEY, BUNDLE_PREFIX, IMAGE_FILE } from './archive.ts';
import { archiveKind } from './layout.ts';
import { AGE_SUFFIX } from './age.ts';
import { errorText, humanSize, printable } from './cli.ts';
import { isRegularFile } from './files.ts';
import { FileDigests, hashFile } from './hash-cache.ts';
import { readManifest, type Manifest, type R2Record } from './manifest.ts';
import type { Step } from './step.ts';
import { pool } from './pool.ts';
import { datedPattern, localCopies } from './dated.ts';
import { readBackSha256, type Backend, type ObjectHead } from './storage.ts';

export interface RestorePoint {
  /** `manifest-T.json`. */
  name: string;
  stamp: string;
  file: string;
  /** Undefined when the file cannot be read as a manifest (then `readError` says why). */
  manifest?: Manifest;
  readError?: string;
}

/** The restore points in BACKUP_DIR, newest first. */
export function listPoints(backupDir: string): RestorePoint[] {
  const stampOf = datedPattern('manifest', 'json');
  return localCopies(backupDir, 'manifest', 'json').map((name) => {
    const file = path.join(backupDir, name);
    const point: RestorePoint = { name, stamp: stampOf.exec(name)![1], file };
    try {
      point.manifest = readManifest(file);
    } catch (e) {
      point.readError = errorText(e);
    }
    return point;
  });
}

export type Wholeness = 'whole' | 'broken' | 'unknown';

export interface Judgement {
  state: Wholeness;
  /** Why it is not whole (broken), or what could not be checked (unknown). */
  why: string[];
}

/** The image a point records: its ID and the sha256 of its saved archive. */
export interface RecordedImage {
  imageId: string;
  sha256: string;
  bytes: number;
  /** The manifest that records it. */
  recordedIn: string;
}

/** The image a manifest records (saved in that run, or unchanged since an earlier save), if any. */
export function recordedImage(point: RestorePoint): RecordedImage | undefined {
  const m = point.manifest;
  const artifact = m?.artifacts.find((a) => a.name === IMAGE_FILE);
  if (!m?.imageId || !artifact) return undefined;
  return { imageId: m.imageId, sha256: artifact.sha256, bytes: artifact.bytes, recordedIn: point.name };
}

export interface JudgeOptions {
  backupDir: string;
  /** The buckets by name (the cache and models buckets), as the manifests record them. */
  buckets: Map<string, Backend>;
  /** The cache bucket's name: the worker image's copy in R2. */
  cacheBucket?: string;
  /** Where the hash cache of Mello's own files lives (COMFYMULTI_STATE_DIR). */
  stateDir: string;
  /** --verify --deep: hash every artifact and read every object back, trusting no cache. */
  deep?: boolean;
  signal?: AbortSignal;
}

/** Something R2 did not answer: the point is unknown, not broken. */
class Unreachable extends Error {}

/**
 * Judges restore points, sharing what they have in common: each artifact and object is checked
 * once however many points name it, Mello's files are hashed only when their stat changed.
 */
export class PointJudge {
  private readonly digests: FileDigests;
  private readonly objects = new Map<string, Promise<ObjectHead | undefined>>();
  private readonly readBack = new Map<string, Promise<string>>();
  private readonly files = new Map<string, Promise<string | undefined>>();
  private imageCopies?: Promise<{ sha256: string; bytes: number; where: string }[]>;

  constructor(readonly o: JudgeOptions) {
    this.digests = FileDigests.load(path.join(o.stateDir, 'hashes-backup-verda.json'));
  }

  /** Whether a point is whole, and why not. */
  async judge(point: RestorePoint): Promise<Judgement> {
    const m = point.manifest;
    if (!m) return { state: 'broken', why: [`${point.name} cannot be read (${point.readError})`] };
    const broken: string[] = [];
    const unknown: string[] = [];
    if (!m.complete) {
      const steps = m.failedSteps.length ? m.failedSteps.join(', ') : 'a step';
      broken.push(m.interrupted ? `the run was interrupted (${steps} not done)` : `the run failed: ${steps}`);
    }
    const dated = m.artifacts.filter((a) => archiveKind(a.name));
    if (!dated.length) broken.push('it names no config archive');
    for (const a of dated) {
      const got = await this.fileSha256(path.join(this.o.backupDir, a.name), a.bytes);
      if (got === undefined) broken.push(`${a.name} is not in BACKUP_DIR`);
      else if (got === 'size') broken.push(`${a.name} has another size than the manifest's`);
      else if (got !== a.sha256) broken.push(`${a.name}: its sha256 is not the manifest's`);
    }
    const bundles = m.r2.filter((r) => r.key.startsWith(BUNDLE_PREFIX));
    if (!bundles.length) broken.push('its config bundle was not sent to R2');
    // The image's object is judged below, by any copy that holds the image; the latest bundle key
    // is overwritten by every run: only the dated bundle is this point's.
    const records = m.r2.filter((r) => r.key.startsWith(BUNDLE_PREFIX) || !isSharedKey(r.key));
    const found: string[] = [];
    await pool(records, 16, async (r) => void found.push((await this.objectProblem(r)) ?? ''), this.o.signal);
    for (const p of found.filter(Boolean)) {
      if (p.startsWith('unknown:')) unknown.push(p.slice('unknown:'.length));
      else broken.push(p);
    }
    const image = recordedImage(point);
    if (image) {
      const copies = await this.imageCopiesHeld().catch((e) => {
        if (this.o.signal?.aborted) throw e;
        unknown.push(`the worker image not checked: ${errorText(e)}`);
        return undefined;
      });
      if (copies && !copies.some((c) => c.sha256 === image.sha256 && c.bytes === image.bytes)) {
        broken.push(
          `its worker image ${shortImageId(image.imageId)} can no longer be had: ` +
            (copies.length ? `${copies.map((c) => c.where).join(' and ')} hold another` : 'no copy on Mello or in R2'),
        );
      }
    }
    if (broken.length) return { state: 'broken', why: [...broken, ...unknown] };
    if (unknown.length) return { state: 'unknown', why: unknown };
    return { state: 'whole', why: [] };
  }

  /** Saves what was hashed; a cache that cannot be saved only costs hashing again. */
  finish(): string | undefined {
    return this.digests.trySave();
  }

  /** sha256 of a file of Mello's (`size`: it has another size; undefined: not there, or not a regular file). */
  private fileSha256(file: string, bytes: number): Promise<string | undefined> {
    let found = this.files.get(file);
    if (!found) {
      found = (async () => {
        if (!isRegularFile(file)) return undefined;
        const st = fs.lstatSync(file, { bigint: true });
        if (Number(st.size) !== bytes) return 'size';
        if (this.o.deep) return hashFile(file, this.o.signal);
        return this.digests.sha256(file, st, this.o.signal);
      })();
      this.files.set(file, found);
    }
    return found;
  }

  /** Why an R2 record is not in its bucket as recorded (`unknown:` what could not be read), or undefined. */
  private async objectProblem(r: R2Record): Promise<string | undefined> {
    const backend = this.o.buckets.get(r.bucket);
    if (!backend) return `unknown:r2://${r.bucket}/${printable(r.key)} not checked: its bucket is not configured here`;
    const name = `${backend.name}/${printable(r.key)}`;
    const id = `${backend.name}/${r.key}`;
    let head = this.objects.get(id);
    if (!head) {
      head = backend.head(r.key, this.o.signal).catch((e) => {
        throw new Unreachable(`${backend.name} could not be read: ${errorText(e)}`);
      });
      this.objects.set(id, head);
    }
    let h: ObjectHead | undefined;
    try {
      h = await head;
    } catch (e) {
      if (this.o.signal?.aborted) throw e;
      return `unknown:${(e as Error).message}`;
    }
    if (!h && r.key.startsWith(BUNDLE_PREFIX) && !r.key.endsWith(AGE_SUFFIX)) {
      // Encryption turned on since: the plaintext bundle was sent again as .age, with its sha256.
      const sealed = await backend.head(r.key + AGE_SUFFIX, this.o.signal).catch((e) => {
        if (this.o.signal?.aborted) throw e;
        return undefined;
      });
      if (sealed?.metadata['plaintext-sha256'] === r.sha256) return undefined;
    }
    if (!h) return `${name} is not in R2`;
    if (h.size !== r.bytes) return `${name} has another size than the one recorded`;
    if (h.metadata.sha256 && h.metadata.sha256 !== r.sha256) return `${name} holds other bytes than the ones recorded`;
    if (this.o.deep) {
      let sha = this.readBack.get(id);
      if (!sha) {
        sha = readBackSha256(backend, r.key, this.o.signal).catch((e) => {
          throw new Unreachable(`${name} could not be read back: ${errorText(e)}`);
        });
        this.readBack.set(id, sha);
      }
      const got = await sha.catch((e) => {
        if (this.o.signal?.aborted) throw e;
        return `unknown:${(e as Error).message}`;
      });
      if (got.startsWith('unknown:')) return got;
      if (got !== r.sha256) return `${name}: the bytes read back are not the ones recorded`;
    }
    return undefined;
  }

  /** The copies of the worker image Mello can see: its own worker-image.tar.gz and the cache bucket's. */
  private imageCopiesHeld() {
    this.imageCopies ??= (async () => {
      const copies: { sha256: string; bytes: number; where: string }[] = [];
      const file = path.join(this.o.backupDir, IMAGE_FILE);
      if (isRegularFile(file)) {
        const st = fs.lstatSync(file, { bigint: true });
        const sha256 = this.o.deep
          ? await hashFile(file, this.o.signal)
          : await this.digests.sha256(file, st, this.o.signal);
        copies.push({ sha256, bytes: Number(st.size), where: `Mello's ${IMAGE_FILE}` });
      }
      const cache = this.o.cacheBucket === undefined ? undefined : this.o.buckets.get(this.o.cacheBucket);
      if (!cache) throw new Error('the cache bucket is not configured here');
      const head = await cache.head(IMAGE_FILE, this.o.signal);
      if (head?.metadata.sha256)
        copies.push({ sha256: head.metadata.sha256, bytes: head.size, where: `${cache.name}/${IMAGE_FILE}` });
      return copies;
    })();
    return this.imageCopies;
  }
}

/** Keys every run overwrites (the latest bundle, the image): not any one point's. */
const isSharedKey = (key: string) => key === IMAGE_FILE || key.startsWith(BUNDLE_KEY);

const shortImageId = (id: string) => id.replace(/^sha256:/, '').slice(0, 12);

/** A point and its judgement. */
export interface JudgedPoint extends RestorePoint {
  judgement: Judgement;
}

/** Every point in BACKUP_DIR judged, newest first. */
export async function judgeAll(judge: PointJudge): Promise<JudgedPoint[]> {
  const judged: JudgedPoint[] = [];
  for (const p of listPoints(judge.o.backupDir)) judged.push({ ...p, judgement: await judge.judge(p) });
  return judged;
}

/** Whole, or unknown (what could not be checked is not held against it). */
export const usable = (p: JudgedPoint) => p.judgement.state !== 'broken';

/**
 * --verify's last word: the newest backup judged as a restore point (the rule rotation and the
 * restore use), and when it is not whole, the newest one that is.
 */
export function newestPointStep(o: { judge: () => PointJudge }): Step {
  return {
    name: 'The newest backup as a restore point',
    moves: 'manifest-*.json: its archives, its R2 bundle and models, a copy of its worker image',
    async run() {
      const judge = o.judge();
      const points = await judgeAll(judge);
      const newest = points[0];
      if (!newest) throw new Error(`no manifest-*.json in ${judge.o.backupDir}: no restore point`);
      if (newest.judgement.state === 'whole') return { summary: `${newest.name} is a whole restore point` };
      const failures = newest.judgement.why.map((w) => `${newest.name}: ${w}`);
      const good = points.find((p) => p.judgement.state === 'whole');
      const warnings = good ? [`the newest whole restore point is ${good.name}`] : [];
      if (!good) failures.push(`no whole restore point in ${judge.o.backupDir}`);
      const state =
        newest.judgement.state === 'unknown' ? 'could not be checked whole' : 'is not a whole restore point';
      return { summary: `${newest.name} ${state}`, failures, warnings };
    },
  };
}

/** One restore point as --list shows it. */
interface ListedPoint {
  stamp: string;
  manifest: string;
  mode?: 'full' | 'quick';
  state: Wholeness;
  why: string[];
  bytes: number;
  imageId?: string;
  /** Where its parts are: BACKUP_DIR, and its dated bundle in R2. */
  where: string[];
}

/**
 * --list of backup-verda and restore-verda: every restore point in BACKUP_DIR, newest first, with
 * whether it is whole and why not, its size and where its parts are. Reads only.
 */
export async function listRestorePoints(judge: PointJudge, json: boolean): Promise<string> {
  const listed: ListedPoint[] = [];
  for (const p of await judgeAll(judge)) {
    const m = p.manifest;
    const bundle = m?.r2.find((r) => r.key.startsWith(BUNDLE_PREFIX));
    listed.push({
      stamp: p.stamp,
      manifest: p.name,
      mode: m?.mode,
      state: p.judgement.state,
      why: p.judgement.why,
      bytes: m?.artifacts.reduce((n, a) => n + a.bytes, 0) ?? 0,
      imageId: m?.imageId,
      where: [judge.o.backupDir, ...(bundle ? [`r2://${bundle.bucket}/${bundle.key}`] : [])],
    });
  }
  if (json) return JSON.stringify({ backupDir: judge.o.backupDir, restorePoints: listed }, null, 2) + '\n';
  const lines = [`Restore points in ${judge.o.backupDir}, newest first:`];
  if (!listed.length) lines.push('  none (no manifest-*.json)');
  const mark = { whole: '✓ whole', broken: '✗ not whole', unknown: '? not checkable now' };
  for (const l of listed) {
    const when = `${l.stamp.slice(0, 4)}-${l.stamp.slice(4, 6)}-${l.stamp.slice(6, 8)} ${l.stamp.slice(9, 11)}:${l.stamp.slice(11, 13)}:${l.stamp.slice(13, 15)}`;
    const image = l.imageId ? `, image ${shortImageId(l.imageId)}` : '';
    lines.push(`  ${l.stamp}  ${when}  ${(l.mode ?? '?').padEnd(5)}  ${mark[l.state]}  ${humanSize(l.bytes)}${image}`);
    for (const why of l.why) lines.push(`      ${why}`);
    lines.push(`      ${l.where.join(' and ')}`);
  }
  lines.push('', 'Restore one with: restore-verda.mts --from STAMP (the default is the newest whole one)');
  return lines.map(printable).join('\n') + '\n';
}
