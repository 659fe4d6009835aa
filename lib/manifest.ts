// The record of a backup-verda run and its manifest, written last; and --verify built on it:
// the newest manifest's artifacts against their bytes and sha256 (and that the archives list),
// and its R2 objects against the sha256 of their sources, recorded when they were sent. Needs no
// Verda: verify still works once the instance is gone.
import fs from 'node:fs';
import path from 'node:path';
import { readBackDecrypted, readIdentities } from './age.ts';
import { LayoutError, archiveKind, checkArchiveFile, listArchive } from './layout.ts';
import { errorText, printable } from './cli.ts';
import { ensurePrivateDir, readRegularFileSync, writeFileAtomic } from './files.ts';
import { hashFile } from './hash-cache.ts';
import { failedBefore, type Step } from './step.ts';
import { copyWarnings, localCopies } from './dated.ts';
import { pool } from './pool.ts';
import { readBackSha256, type Backend } from './storage.ts';

/** An artifact of a run, as the manifest lists it. */
export interface Artifact {
  name: string;
  bytes: number;
  sha256: string;
}

/** An R2 object of the run. */
export interface R2Record {
  bucket: string;
  key: string;
  bytes: number;
  sha256: string;
  action: 'uploaded' | 'skipped';
  /** `age`: R2 holds the object age-encrypted; `bytes` and `sha256` are the ciphertext's (what was stored). */
  encrypted?: 'age';
  /** For an encrypted object: the sha256 of its plaintext (the bundle on Mello), checked by --verify --deep. */
  plaintextSha256?: string;
}

export interface Manifest {
  version: 1;
  script: string;
  timestamp: string;
  mode: 'full' | 'quick';
  verdaHost: string;
  imageId?: string;
  complete: boolean;
  /** The run was stopped by a signal or a lost connection: what it records is what was done. */
  interrupted?: boolean;
  failedSteps: string[];
  artifacts: Artifact[];
  r2: R2Record[];
}

/** What a run has done so far, shared by its steps; the manifest is written from it, last. */
export class RunRecord {
  readonly artifacts: Artifact[] = [];
  readonly r2: R2Record[] = [];
  imageId?: string;
  /** `stamp`: the run's `YYYYMMDD-HHMMSS`, in every dated name it writes. */
  constructor(readonly stamp: string) {}
  artifact(a: Artifact) {
    this.artifacts.push(a);
  }
  object(o: R2Record) {
    this.r2.push(o);
  }
}

/**
 * The manifest, written last: every artifact and R2 object of the run, and whether the run
 * completed. Written after an interrupt too (marked so): what was done stays on record. A run
 * that made no config archive and no image writes none.
 */
export function manifestStep(o: { dir: string; record: RunRecord; mode: Manifest['mode']; verdaHost: string }): Step {
  const name = `manifest-${o.record.stamp}.json`;
  return {
    name: 'Manifest',
    moves: `→ ${o.dir}/${name}`,
    always: true,
    async run(ctx) {
      if (ctx.dryRun) return { summary: `would write ${name}` };
      if (!o.record.artifacts.some((a) => a.name !== 'tailscale-ip.txt'))
        return { status: 'skipped', summary: 'no archive was made: no manifest written' };
      const failedSteps = failedBefore(ctx).map((r) => r.name);
      const manifest: Manifest = {
        version: 1,
        script: 'backup-verda',
        timestamp: o.record.stamp,
        mode: o.mode,
        verdaHost: o.verdaHost,
        imageId: o.record.imageId,
        complete: failedSteps.length === 0,
        ...(ctx.signal.aborted ? { interrupted: true } : {}),
        failedSteps,
        artifacts: o.record.artifacts,
        r2: o.record.r2,
      };
      ensurePrivateDir(o.dir);
      writeFileAtomic(path.join(o.dir, name), JSON.stringify(manifest, null, 2) + '\n', 0o600);
      const state = manifest.complete ? '' : manifest.interrupted ? ' (interrupted: incomplete)' : ' (incomplete)';
      return { summary: `${name}: ${o.record.artifacts.length} artifacts, ${o.record.r2.length} R2 objects${state}` };
    },
  };
}

export function readManifest(file: string): Manifest {
  try {
    const m = JSON.parse(readRegularFileSync(file).toString('utf8')) as Manifest;
    if (!Array.isArray(m.artifacts) || !Array.isArray(m.r2) || typeof m.complete !== 'boolean')
      throw new Error('not a manifest');
    return m;
  } catch (e) {
    throw new Error(`${file} is not a readable manifest: ${errorText(e)}`);
  }
}

function readNewest(dir: string): { file: string; manifest: Manifest } {
  const newest = localCopies(dir, 'manifest', 'json')[0];
  if (!newest) throw new Error(`no manifest-*.json in ${dir}: nothing to verify`);
  const file = path.join(dir, newest);
  return { file, manifest: readManifest(file) };
}

/** The newest manifest that records a complete run, if any. */
function newestComplete(dir: string): { file: string; manifest: Manifest } | undefined {
  for (const name of localCopies(dir, 'manifest', 'json')) {
    const file = path.join(dir, name);
    try {
      const manifest = readManifest(file);
      if (manifest.complete && manifest.artifacts.length) return { file, manifest };
    } catch {
      /* a damaged manifest is reported by the newest check when it is the newest */
    }
  }
  return undefined;
}

/** Failures of one manifest's artifacts: missing, other bytes, other sha256, or not an archive. */
async function checkArtifacts(dir: string, manifest: Manifest, signal: AbortSignal): Promise<string[]> {
  const failures: string[] = [];
  for (const a of manifest.artifacts) {
    const p = path.join(dir, a.name);
    let size: number;
    try {
      size = fs.lstatSync(p).size;
    } catch {
      failures.push(`missing: ${a.name}`);
      continue;
    }
    if (size !== a.bytes) {
      failures.push(`differs: ${a.name} has ${size} bytes, the manifest says ${a.bytes}`);
      continue;
    }
    const sha = await hashFile(p, signal).catch((e) => `unreadable (${errorText(e)})`);
    if (sha !== a.sha256) {
      failures.push(`differs: ${a.name} sha256 is not the manifest's${sha.startsWith('unreadable') ? `: ${sha}` : ''}`);
      continue;
    }
    // A config archive is read through its kind's layout, as a restore would read it.
    const kind = archiveKind(a.name);
    if (kind) {
      await checkArchiveFile(p, kind, signal).catch((e) =>
        failures.push(
          e instanceof LayoutError
            ? `refused: ${a.name} holds ${e.message}`
            : `damaged: ${a.name} does not list as an archive (${errorText(e)})`,
        ),
      );
    } else if (a.name.endsWith('.tar.gz')) {
      await listArchive(p).catch((e) =>
        failures.push(`damaged: ${a.name} does not list as an archive (${errorText(e)})`),
      );
    }
  }
  return failures;
}

/**
 * The newest backup is whole: its manifest records a complete run with artifacts, and each
 * artifact is present with its bytes and sha256 (archives list whole). When the newest run
 * failed, that is the failure, and the newest complete backup is checked too, to say what there is.
 */
export function verifyArtifactsStep(dir: string): Step {
  return {
    name: 'Local artifacts against the newest manifest',
    moves: `${dir}/manifest-*.json → ${dir}`,
    async run(ctx) {
      const { file, manifest } = readNewest(dir);
      const name = path.basename(file);
      const warnings = copyWarnings(dir, 'manifest', 'json');
      const failures = await checkArtifacts(dir, manifest, ctx.signal); // at most one per artifact
      const whole = manifest.artifacts.length - failures.length;
      if (!manifest.artifacts.length) failures.push(`${name} records no artifact: the newest backup holds nothing`);
      if (!manifest.complete) {
        failures.push(`${name} records an incomplete run: ${manifest.failedSteps.join(', ') || 'a step'} failed`);
        const good = newestComplete(dir);
        if (!good) failures.push(`no complete backup in ${dir}`);
        else {
          const older = await checkArtifacts(dir, good.manifest, ctx.signal);
          const goodName = path.basename(good.file);
          if (older.length) failures.push(...older.map((f) => `${goodName}: ${f}`));
          else
            warnings.push(
              `the newest complete backup, ${goodName}, is whole (${good.manifest.artifacts.length} artifacts)`,
            );
        }
      }
      return { summary: `${whole} of ${manifest.artifacts.length} artifacts of ${name} whole`, failures, warnings };
    },
  };
}

/** What checking a manifest's R2 records found: failures named, and what was checked how. */
export interface ObjectsChecked {
  failures: string[];
  /** Objects without sha256 metadata (bash-era uploads), checked by size only. */
  sizeOnly: number;
  /** Age-encrypted objects read back, decrypted and matched against the bundle sent. */
  decrypted: number;
}

/**
 * The buckets configured here, each with the variable that named it (`R2_CACHE_BUCKET=name`): a
 * manifest's bucket missing among them is a misnamed or changed variable, and the message says which.
 */
function bucketNames(backends: Map<string, Backend>): string {
  const named = [...backends].map(([bucket, b]) => {
    const variable = (b as { target?: { variables?: { bucket?: string } } }).target?.variables?.bucket;
    return variable ? `${variable}=${bucket}` : bucket;
  });
  return named.length ? named.join(', ') : 'none configured';
}

/**
 * Each record's object against it: present, its size, its sha256 metadata; `deep` reads every
 * byte back. An age-encrypted object is read back and decrypted with `ageIdentityFile` under
 * `deep` or `decrypt` (the drill): its plaintext must be the bundle that was sent. Shared by
 * backup-verda --verify and restore-verda's --verify and --drill.
 */
export async function checkObjects(
  records: R2Record[],
  backends: Map<string, Backend>,
  opts: { deep: boolean; decrypt?: boolean; ageIdentityFile?: string; signal: AbortSignal },
): Promise<ObjectsChecked> {
  const { signal } = opts;
  const found: ObjectsChecked = { failures: [], sizeOnly: 0, decrypted: 0 };
  const failures = found.failures;
  // Read once, on first need; its problem (unset, unreadable, no identity) is every encrypted
  // object's: said once, after the check, naming each object it left undecrypted.
  let identities: string[] | Error | undefined;
  const identitiesFor = () => {
    identities ??= (() => {
      if (!opts.ageIdentityFile) return new Error('AGE_IDENTITY_FILE is not set');
      try {
        return readIdentities(opts.ageIdentityFile);
      } catch (e) {
        return e as Error;
      }
    })();
    return identities;
  };
  const undecrypted = new Set<R2Record>();
  await pool(
    records,
    8,
    async (o) => {
      const backend = backends.get(o.bucket);
      const name = `r2://${o.bucket}/${printable(String(o.key))}`;
      // A record that cannot be checked proves nothing: never passed over.
      const problem = recordProblem(o);
      if (problem) return void failures.push(`${name}: the manifest's record ${problem}: nothing to check it against`);
      if (!backend)
        return void failures.push(`${name}: no bucket configured here is ${o.bucket} (${bucketNames(backends)})`);
      const head = await backend.head(o.key, signal);
      if (!head) failures.push(`missing: ${name}`);
      else if (head.size !== o.bytes) failures.push(`differs: ${name} has ${head.size} bytes, the source ${o.bytes}`);
      else if (head.metadata.sha256 && head.metadata.sha256 !== o.sha256)
        failures.push(`differs: ${name} sha256 metadata is not the source's`);
      else if ((opts.deep || opts.decrypt) && o.encrypted === 'age') {
        const ids = identitiesFor();
        if (ids instanceof Error) undecrypted.add(o);
        else {
          try {
            const r = await readBackDecrypted(await backend.get(o.key, signal), ids, signal);
            if (r.sha256 !== o.sha256) failures.push(`differs: ${name} bytes read back are not the ones sent`);
            else if (o.plaintextSha256 && r.plaintextSha256 !== o.plaintextSha256)
              failures.push(`differs: ${name} decrypts to other bytes than the bundle sent`);
            else found.decrypted++;
          } catch (e) {
            if (signal.aborted) throw e;
            failures.push(`${name} cannot be decrypted with AGE_IDENTITY_FILE: ${errorText(e)}`);
          }
        }
      } else if (opts.deep) {
        if ((await readBackSha256(backend, o.key, signal)) !== o.sha256)
          failures.push(`differs: ${name} bytes read back are not the source's`);
      } else if (!head.metadata.sha256) found.sizeOnly++;
    },
    signal,
  );
  if (undecrypted.size) {
    const names = records.filter((o) => undecrypted.has(o)).map((o) => `r2://${o.bucket}/${printable(String(o.key))}`);
    const list = names.join(' and ');
    failures.push(
      opts.ageIdentityFile
        ? `not decrypted: ${list}: ${(identities as Error).message}`
        : `AGE_IDENTITY_FILE is not set: it is needed to decrypt ${list} (age-encrypted)`,
    );
  }
  return found;
}

/** What is wrong with an R2 record (no sha256, no size), or undefined. */
export function recordProblem(o: Partial<R2Record>): string | undefined {
  if (typeof o.key !== 'string' || !o.key) return 'has no key';
  if (typeof o.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(o.sha256)) return 'has no sha256';
  if (typeof o.bytes !== 'number' || !Number.isSafeInteger(o.bytes) || o.bytes < 0) return 'has no size';
  return undefined;
}

/** The objects' warning line: those checked by size only. */
export const sizeOnlyWarnings = (found: ObjectsChecked) =>
  found.sizeOnly
    ? [
        `${found.sizeOnly} objects have no sha256 metadata (bash-era uploads): checked by size only; --deep reads them back`,
      ]
    : [];

/** The summary's note of decrypted objects. */
export const decryptedNote = (found: ObjectsChecked) =>
  found.decrypted ? ` (${found.decrypted} age-encrypted, decrypted with AGE_IDENTITY_FILE)` : '';

/** --verify: every R2 object the newest manifest records, against the sha256 of what was sent. */
export function verifyObjectsStep(
  dir: string,
  backends: Map<string, Backend>,
  deep: boolean,
  opts: { ageIdentityFile?: string } = {},
): Step {
  return {
    name: `R2 objects against the sources' sha256${deep ? ' (reading every byte back)' : ''}`,
    moves: `${dir}/manifest-*.json → ${[...backends.values()].map((b) => b.name).join(', ')}`,
    async run(ctx) {
      const { manifest } = readNewest(dir);
      const records = manifest.r2;
      const found = await checkObjects(records, backends, { deep, ...opts, signal: ctx.signal });
      return {
        summary: `${records.length - found.failures.length} of ${records.length} objects match their sources${decryptedNote(found)}`,
        failures: found.failures,
        warnings: sizeOnlyWarnings(found),
        data: { checked: records.length, decrypted: found.decrypted },
      };
    },
  };
}
