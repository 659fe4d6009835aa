// Dated copies: `kind-YYYYMMDD-HHMMSS.ext`, in the local time of the run that wrote them, as the
// bash originals named them. What is dated, how it sorts, and what is odd about a copy.
import fs from 'node:fs';
import path from 'node:path';
import { isRegularFile } from './files.ts';

/** `YYYYMMDD-HHMMSS` in local time, as the bash originals' `date +%Y%m%d-%H%M%S`. */
export function timestamp(d = new Date()): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** A run's stamp, `YYYYMMDD-HHMMSS`, as a pattern's source. */
const STAMP = '\\d{8}-\\d{6}';

/** Whether `text` is a run's stamp. */
export const isStamp = (text: string) => new RegExp(`^${STAMP}$`).test(text);

/** Matches `kind-T.ext` exactly; group 1 is T. */
export function datedPattern(kind: string, ext: string): RegExp {
  return new RegExp(`^${escape(kind)}-(${STAMP})\\.${escape(ext)}$`);
}

/** The dated copies of a kind among names, newest first. */
export function datedCopies(names: string[], kind: string, ext: string): string[] {
  const re = datedPattern(kind, ext);
  return names
    .filter((n) => re.test(n))
    .sort()
    .reverse();
}

/** The time a `YYYYMMDD-HHMMSS` stamp names, in local time. */
export function stampTime(stamp: string): Date {
  const n = (from: number, len: number) => Number(stamp.slice(from, from + len));
  return new Date(n(0, 4), n(4, 2) - 1, n(6, 2), n(9, 2), n(11, 2), n(13, 2));
}

/** A stamp more than five minutes ahead of now: written while the clock was ahead. */
export function isFuture(stamp: string, now = Date.now()): boolean {
  return stampTime(stamp).getTime() > now + 5 * 60_000;
}

function names(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}

/** The dated copies of a kind in a directory that are regular files, newest first. */
export function localCopies(dir: string, kind: string, ext: string): string[] {
  return datedCopies(names(dir), kind, ext).filter((n) => isRegularFile(path.join(dir, n)));
}

/** The newest dated copy of a kind in a directory, if any (regular files only: never a FIFO). */
export function newestLocal(dir: string, kind: string, ext: string): string | undefined {
  const newest = localCopies(dir, kind, ext)[0];
  return newest && path.join(dir, newest);
}

/**
 * What is odd about a kind's dated copies, as warnings: a name of ours that is not a regular file
 * (ignored), and a stamp in the future, which stays "newest" until its time comes.
 */
export function copyWarnings(dir: string, kind: string, ext: string): string[] {
  const re = datedPattern(kind, ext);
  const warnings: string[] = [];
  for (const name of datedCopies(names(dir), kind, ext)) {
    if (!isRegularFile(path.join(dir, name))) warnings.push(`${path.join(dir, name)} is not a regular file: ignored`);
    else if (isFuture(re.exec(name)![1])) {
      warnings.push(
        `${name} is dated in the future (the clock was ahead when it was written): it counts as the newest ${kind} until then`,
      );
    }
  }
  return warnings;
}
