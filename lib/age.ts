// Encryption at rest for what leaves Mello holding a secret (the R2 config bundle), with age
// (https://age-encryption.org) through `age-encryption`, its reference TypeScript
// implementation: X25519 recipients, ChaCha20-Poly1305 in 64 KiB chunks, streamed. Nothing here
// is cryptography of our own: this file reads keys, joins Node streams to the library's web
// streams, and says what is missing in the admin's terms.
//
// The library is imported on first use only: it costs about 0.1 s to load, and most runs never
// encrypt or decrypt anything.
import path from 'node:path';
import { Readable, pipeline as chain } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import crypto from 'node:crypto';
import { UsageError } from './cli.ts';
import { readRegularFileSync, tap } from './files.ts';

/** The suffix of every encrypted object's key: `verda-config-backup.tar.gz.age`. */
export const AGE_SUFFIX = '.age';

export const isEncryptedKey = (key: string) => key.endsWith(AGE_SUFFIX);

const age = () => import('age-encryption');

// A recipient as age writes it: `age1` and bech32 (lowercase, no 1/b/i/o). The checksum and the
// key itself are checked by the library (loadRecipients) before anything is done.
const RECIPIENT = /^age1[02-9ac-hj-np-z]{50,}$/;

/** AGE_RECIPIENTS as configured: the public keys themselves, or the file that lists them. */
export type AgeRecipients = { keys: string[] } | { file: string };

const badRecipients = (why: string) => new UsageError(`AGE_RECIPIENTS ${why}`);

/**
 * AGE_RECIPIENTS: one or more `age1...` public keys separated by spaces or commas, or the path of
 * a recipients file (one per line, `#` comments, as `age -R` reads it). Undefined when unset or
 * empty. Its form is checked here, for every script (a UsageError naming AGE_RECIPIENTS: exit 2);
 * a file is read, and every key checked by the age library, by the script that encrypts
 * (loadRecipients), so that a Verda whose configuration names a file only Mello has still runs.
 */
export function parseAgeRecipients(value: string | undefined, home: string): AgeRecipients | undefined {
  const raw = value?.trim();
  if (!raw) return undefined;
  // Before anything that echoes the value: it may be an identity pasted by mistake.
  if (/AGE-SECRET-KEY-/i.test(raw))
    throw badRecipients('holds a secret key: give the public key (age-keygen -y FILE), never the identity');
  if (/^age1/i.test(raw)) return { keys: checkWords(raw.split(/[\s,]+/).filter(Boolean), '') };
  const file = raw === '~' || raw.startsWith('~/') ? path.join(home, raw.slice(1)) : raw;
  if (!path.isAbsolute(file) || /[\0\n\r]/.test(file)) {
    throw badRecipients(
      `must be age public keys (age1...) or the absolute path of a file of them (got ${JSON.stringify(raw)})`,
    );
  }
  return { file };
}

function checkWords(words: string[], where: string): string[] {
  if (!words.length) throw badRecipients(`names no recipient${where}`);
  for (const w of words) {
    if (/^(ssh-|ecdsa-|sk-)/.test(w)) {
      throw badRecipients(
        `holds an SSH key${where} (${w.split(/\s/)[0]}): only age recipients (age1..., from age-keygen) are supported`,
      );
    }
    if (/^AGE-SECRET-KEY-/i.test(w))
      throw badRecipients(`holds a secret key${where}: give the public key (age-keygen -y FILE), never the identity`);
    if (!RECIPIENT.test(w))
      throw badRecipients(`holds something that is not an age public key${where}: ${JSON.stringify(w.slice(0, 80))}`);
  }
  return [...new Set(words)];
}

/**
 * The recipients to encrypt to: the file read (when AGE_RECIPIENTS names one) and each key
 * checked by the age library itself (bech32 checksum, key type). Every problem is a UsageError
 * naming AGE_RECIPIENTS, raised while the plan is built: exit 2, nothing done.
 */
export async function loadRecipients(configured: AgeRecipients): Promise<string[]> {
  let keys: string[];
  if ('keys' in configured) keys = configured.keys;
  else {
    let text: string;
    try {
      text = readRegularFileSync(configured.file, { follow: true }).toString('utf8');
    } catch (e) {
      const why = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
      throw badRecipients(`names a file that cannot be read: ${configured.file} (${why})`);
    }
    const lines = text
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#'));
    keys = checkWords(lines, ` in ${configured.file}`);
  }
  const { Encrypter } = await age();
  for (const r of keys) {
    try {
      new Encrypter().addRecipient(r);
    } catch (e) {
      throw badRecipients(`holds an invalid age public key ${JSON.stringify(r)}: ${(e as Error).message}`);
    }
  }
  return keys;
}

/**
 * The ciphertext of `plaintext` for the recipients, as a Node stream: read chunk by chunk, never
 * whole in memory. Its bytes are what `age -d -i IDENTITY` decrypts.
 */
export async function encryptStream(recipients: string[], plaintext: Readable): Promise<Readable> {
  const { Encrypter } = await age();
  const e = new Encrypter();
  for (const r of recipients) e.addRecipient(r);
  const web = await e.encrypt(Readable.toWeb(plaintext) as unknown as ReadableStream<Uint8Array>);
  return Readable.fromWeb(web as unknown as import('node:stream/web').ReadableStream<Uint8Array>);
}

/** What is wrong with AGE_IDENTITY_FILE, in the admin's terms (the step or restore shows it). */
class IdentityError extends UsageError {}

/**
 * AGE_IDENTITY_FILE, required: `purpose` says what needs it ("to decrypt r2://.../x.age").
 * Throws an IdentityError naming the variable when it is not set.
 */
export function requireIdentityFile(file: string | undefined, purpose: string): string {
  if (!file) throw new IdentityError(`AGE_IDENTITY_FILE is not set: it is needed ${purpose}`);
  return file;
}

/**
 * The identities (`AGE-SECRET-KEY-1...` lines, as age-keygen writes them; `#` comments ignored)
 * of an identity file. The key text is never put into a message.
 */
export function readIdentities(file: string): string[] {
  let text: string;
  try {
    text = readRegularFileSync(file, { follow: true }).toString('utf8');
  } catch (e) {
    throw new IdentityError(
      `AGE_IDENTITY_FILE cannot be read: ${file} (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
    );
  }
  if (text.startsWith('age-encryption.org/')) {
    throw new IdentityError(
      `AGE_IDENTITY_FILE ${file} is itself encrypted (age -p): give a plain identity file (age-keygen -o FILE)`,
    );
  }
  const lines = text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const ids = lines.filter((l) => /^AGE-SECRET-KEY-/.test(l));
  if (!ids.length) {
    const ssh = lines.some((l) => l.startsWith('-----BEGIN'));
    throw new IdentityError(
      `AGE_IDENTITY_FILE ${file} holds no age identity (AGE-SECRET-KEY-1..., from age-keygen)${ssh ? ': SSH keys are not supported' : ''}`,
    );
  }
  return ids;
}

/**
 * Decrypts an age stream with the identities of `identityFile` (AGE_IDENTITY_FILE): resolves
 * once the header is read and a file key unwrapped, to the plaintext as a Node stream. Each
 * 64 KiB chunk is authenticated before it is given out, and a truncated or altered stream ends in
 * an error, never in short or wrong plaintext. For restore-verda `--from r2` and `--verify --deep`.
 *
 *     const plain = await decryptStream(cfg.ageIdentityFile!, await cache.get(key));
 *     await pipeline(plain, zlib.createGunzip(), tar.extract(...));
 */
export async function decryptStream(identityFile: string | string[], ciphertext: Readable): Promise<Readable> {
  try {
    const { Decrypter } = await age();
    const d = new Decrypter();
    const ids = Array.isArray(identityFile) ? identityFile : readIdentities(identityFile);
    for (const id of ids) {
      try {
        d.addIdentity(id);
      } catch (e) {
        throw new IdentityError(`AGE_IDENTITY_FILE holds an identity the age library refuses: ${(e as Error).message}`);
      }
    }
    let web;
    try {
      web = await d.decrypt(Readable.toWeb(ciphertext) as unknown as ReadableStream<Uint8Array>);
    } catch (e) {
      const said = (e as Error).message;
      if (/no identity matched/i.test(said))
        throw new Error('it was not encrypted to any identity in AGE_IDENTITY_FILE (another key pair?)');
      throw new Error(`it is not a readable age file: ${said}`);
    }
    return Readable.fromWeb(web as unknown as import('node:stream/web').ReadableStream<Uint8Array>);
  } catch (e) {
    ciphertext.destroy(); // nothing more is read from it: an R2 body's connection is let go
    throw e;
  }
}

/**
 * Reads an encrypted object back whole (--verify --deep): the sha256 of its bytes as stored and
 * the sha256 of its plaintext, in one pass.
 */
export async function readBackDecrypted(
  body: Readable,
  identities: string[],
  signal?: AbortSignal,
): Promise<{ sha256: string; plaintextSha256: string }> {
  const stored = crypto.createHash('sha256');
  const cipher = chain(
    body,
    tap((chunk) => void stored.update(chunk)),
    () => {},
  ); // destroying either destroys both
  const plain = crypto.createHash('sha256');
  await pipeline(await decryptStream(identities, cipher), plain, { signal });
  return { sha256: stored.digest('hex'), plaintextSha256: plain.digest('hex') };
}
