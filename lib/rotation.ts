// Rotation. backup-verda's
// BACKUP_DIR rotates by restore points (lib/restore-point.ts): the KEEP_BACKUPS newest whole ones
// plus the newest whole one recording the worker image are kept, and a dated artifact goes only
// when no kept point names it, so failed runs never push a whole point out. The R2 bundles and
// backup-cron's SFS copies rotate from their own listings, the KEEP_BACKUPS newest per kind.
import fs from 'node:fs';
import path from 'node:path';
import { datedPattern, localCopies } from './dated.ts';
import type { Step } from './step.ts';
import { recordedImage, usable, type JudgedPoint } from './restore-point.ts';

/** Deletes all but the `keep` newest dated copies of a kind in a directory; returns what went. */
export function rotateLocal(dir: string, kind: string, ext: string, keep: number): string[] {
  const old = localCopies(dir, kind, ext).slice(keep);
  for (const name of old) fs.rmSync(path.join(dir, name), { force: true });
  return old;
}

/**
 * The last step of a run: rotation. It runs after failed steps too (rotation by restore points
 * never counts a failed run against a whole one), but not after an interrupt. `rotate` deletes
 * and returns what went, with notes on what was kept.
 */
export function rotationStep(opts: {
  where: string;
  keep: number;
  /** What is kept, for the step line. */
  what?: string;
  rotate: (signal: AbortSignal) => Promise<{ deleted: string[]; notes?: string[] }>;
  /** Warnings about the copies (copyWarnings), given whether or not anything is deleted. */
  inspect?: () => string[];
}): Step {
  return {
    name: 'Rotation',
    moves: `keep ${opts.what ?? `the ${opts.keep} newest dated copies of each kind`} in ${opts.where}`,
    async run(ctx) {
      const warnings = opts.inspect?.() ?? [];
      if (ctx.dryRun) return { summary: `would keep ${opts.what ?? `the ${opts.keep} newest of each kind`}`, warnings };
      const { deleted, notes = [] } = await opts.rotate(ctx.signal);
      const what = deleted.length ? `deleted ${deleted.length} older copies` : 'nothing to delete';
      return { summary: [what, ...notes].join('; '), warnings, data: { deleted } };
    },
  };
}

/**
 * backup-verda's BACKUP_DIR by restore points. Kept: the `keep` newest points that are whole (or
 * unknown: what could not be checked is not held against a point), the newest whole one that
 * records the worker image, and, as the record of what went wrong, up to `keep` newer points that
 * are not whole; an unreadable manifest is never deleted. A dated artifact goes only when no kept
 * manifest names it. Dated artifacts no manifest names: older than every manifest, they are the
 * bash originals' (the `keep` newest of each kind stay); newer, what a killed run left (they go).
 */
export function rotateByRestorePoints(
  dir: string,
  judged: JudgedPoint[],
  keep: number,
  kinds: string[],
): { deleted: string[]; kept: JudgedPoint[]; notes: string[] } {
  const usablePoints = judged.filter(usable);
  const kept = usablePoints.slice(0, keep);
  const imagePoint = usablePoints.find((p) => recordedImage(p));
  if (imagePoint && !kept.includes(imagePoint)) kept.push(imagePoint);
  const oldestKept = kept.length ? kept[kept.length - 1].stamp : undefined;
  const record = judged
    .filter((p) => !kept.includes(p) && p.manifest && (oldestKept === undefined || p.stamp > oldestKept))
    .slice(0, keep);
  // The newest point that records the worker image, whole or not: the restore takes the image
  // from the newest backup that recorded it whose bytes can still be had, complete run or not.
  const imageRecord = judged.find((p) => recordedImage(p));
  const retained = new Set([
    ...kept,
    ...record,
    ...(imageRecord ? [imageRecord] : []),
    ...judged.filter((p) => !p.manifest),
  ]);
  const named = new Set([...retained].flatMap((p) => p.manifest?.artifacts.map((a) => a.name) ?? []));
  const unreadableStamps = new Set(judged.filter((p) => !p.manifest).map((p) => p.stamp));
  const oldestManifest = judged.length ? judged[judged.length - 1].stamp : undefined;
  const manifestStamps = new Set(judged.map((p) => p.stamp));
  const doomed: string[] = [];
  for (const kind of kinds) {
    const re = datedPattern(kind, 'tar.gz');
    let bashEra = 0;
    for (const name of localCopies(dir, kind, 'tar.gz')) {
      const stamp = re.exec(name)![1];
      if (named.has(name) || unreadableStamps.has(stamp)) continue;
      const orphanOfOldTimes = !manifestStamps.has(stamp) && (oldestManifest === undefined || stamp < oldestManifest);
      if (orphanOfOldTimes && bashEra++ < keep) continue;
      doomed.push(name);
    }
  }
  doomed.push(...judged.filter((p) => !retained.has(p)).map((p) => p.name));
  for (const name of doomed) fs.rmSync(path.join(dir, name), { force: true });
  const whole = kept.filter((p) => p.judgement.state === 'whole').length;
  const unknown = kept.length - whole;
  const notes = [
    `${kept.length} restore point${kept.length === 1 ? '' : 's'} kept` +
      (kept.length ? ` (${whole} whole${unknown ? `, ${unknown} not checkable now` : ''})` : '') +
      (imagePoint ? `, the newest recording the worker image: ${imagePoint.name}` : ''),
  ];
  return { deleted: doomed, kept, notes };
}
