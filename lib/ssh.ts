// Running commands on the other machine: one OpenSSH connection per run (a ControlMaster
// socket in a private directory), every command over it; or, for a host named `local`, right
// here with no SSH at all. Commands are argument lists: locally no shell is involved, and the
// remote shell gets each argument single-quoted, so no name or value is ever parsed as code.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Writable } from 'node:stream';
import { $ } from 'zx';

$.verbose = false;
$.quiet = true;

/** One argument for a POSIX shell (sh, dash, bash, zsh alike): single quotes, `'` as `'\''`. */
export function shellQuote(arg: string): string {
  return /^[A-Za-z0-9_\/.,:=@%+-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

export interface RunOptions {
  /** Run it through the sudo command (VERDA_SUDO), for root-only paths. */
  sudo?: boolean;
  /** Given on its standard input (how secrets are passed: never on a command line). */
  input?: string | Buffer;
  signal?: AbortSignal;
  /** Where stderr lines go as they come (progress of a remote run); else collected. */
  onStderr?: (chunk: string) => void;
  /**
   * Keep stdin open after `input` until the command ends: a remote command that watches its
   * stdin learns that this side is gone (interrupted, link dropped) and stops cleanly.
   */
  holdStdin?: boolean;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export class HostError extends Error {}

export interface Host {
  /** For messages: `verda (dev@verda)`, `local`. */
  readonly label: string;
  /** Runs a command there, its output captured. Rejects only when it could not run at all. */
  run(argv: string[], opts?: RunOptions): Promise<RunResult>;
  /** Runs a command there with its stdout streamed into `into` (archives, images). */
  stream(argv: string[], into: Writable, opts?: RunOptions): Promise<RunResult>;
  close(): Promise<void>;
}

interface SpawnPlan {
  file: string;
  args: string[];
}

/** Spawns without a shell; stdout either collected or streamed; stderr collected (bounded). */
function execute(plan: SpawnPlan, opts: RunOptions, into?: Writable): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(plan.file, plan.args, { stdio: ['pipe', 'pipe', 'pipe'], signal: opts.signal });
    let stdout = '';
    let stderr = '';
    if (into) {
      child.stdout.pipe(into, { end: false });
      into.once('error', (e) => child.kill('SIGTERM') && reject(e));
    } else child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => {
      const text = d.toString();
      if (opts.onStderr) opts.onStderr(text);
      if (stderr.length < 64 * 1024) stderr += text;
    });
    child.on('error', (e) => reject(opts.signal?.aborted ? opts.signal.reason : e));
    child.stdin.on('error', () => {}); // a command that does not read its input
    if (opts.holdStdin) child.stdin.write(opts.input ?? '');
    else child.stdin.end(opts.input ?? '');
    child.on('close', (code, signal) => {
      if (opts.signal?.aborted) return reject(opts.signal.reason);
      // ssh's own 255 with nothing said: the connection went away under the command.
      if (plan.file === 'ssh' && code === 255 && !stderr.trim()) stderr = 'the SSH connection was lost';
      resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr });
    });
  });
}

export class LocalHost implements Host {
  readonly label = 'local';
  constructor(private readonly sudo: string[]) {}
  private plan(argv: string[], sudo?: boolean): SpawnPlan {
    const full = sudo ? [...this.sudo, ...argv] : argv;
    return { file: full[0], args: full.slice(1) };
  }
  run(argv: string[], opts: RunOptions = {}) {
    return execute(this.plan(argv, opts.sudo), opts);
  }
  stream(argv: string[], into: Writable, opts: RunOptions = {}) {
    return execute(this.plan(argv, opts.sudo), opts, into);
  }
  async close() {}
}

export interface SshOptions {
  configFile?: string;
  connectTimeoutSeconds?: number;
  sudo: string[];
  signal?: AbortSignal;
}

export class SshHost implements Host {
  readonly label: string;
  private constructor(
    readonly destination: string,
    private readonly socket: string,
    private readonly dir: string,
    private readonly baseArgs: string[],
    private readonly sudo: string[],
  ) {
    this.label = `${destination}`;
  }

  /**
   * Opens the one connection of this run. An unreachable host fails within the connect
   * timeout, naming the host and what ssh said.
   */
  static async connect(destination: string, opts: SshOptions): Promise<SshHost> {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'comfymulti-ssh-'));
    fs.chmodSync(dir, 0o700);
    const socket = path.join(dir, 'control');
    const timeout = opts.connectTimeoutSeconds ?? 10;
    const baseArgs = [
      ...(opts.configFile ? ['-F', opts.configFile] : []),
      '-o', 'BatchMode=yes',
      '-o', `ConnectTimeout=${timeout}`,
      '-o', 'ServerAliveInterval=15',
      '-o', 'ServerAliveCountMax=3',
      '-o', `ControlPath=${socket}`,
    ];
    // -f: ssh goes to the background once authenticated, so its exit status says whether the
    // connection stands. ControlPersist bounds an orphaned master if this process is killed -9.
    const master = await $({ nothrow: true, signal: opts.signal, timeout: `${timeout + 5}s` })`ssh ${baseArgs} -o ControlMaster=yes -o ControlPersist=120 -f -N ${destination}`;
    if (master.exitCode !== 0) {
      fs.rmSync(dir, { recursive: true, force: true });
      const said = master.stderr.trim().split('\n').filter(Boolean).pop() ?? `exit ${master.exitCode}`;
      throw new HostError(`cannot reach ${destination} over SSH: ${said}`);
    }
    return new SshHost(destination, socket, dir, baseArgs, opts.sudo);
  }

  private plan(argv: string[], sudo?: boolean): SpawnPlan {
    const full = sudo ? [...this.sudo, ...argv] : argv;
    const remote = full.map(shellQuote).join(' ');
    return { file: 'ssh', args: [...this.baseArgs, '-o', 'ControlMaster=no', this.destination, '--', remote] };
  }
  run(argv: string[], opts: RunOptions = {}) {
    return execute(this.plan(argv, opts.sudo), opts);
  }
  stream(argv: string[], into: Writable, opts: RunOptions = {}) {
    return execute(this.plan(argv, opts.sudo), opts, into);
  }
  async close() {
    await $({ nothrow: true, timeout: '10s' })`ssh ${this.baseArgs} -O exit ${this.destination}`;
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** `local` means this machine; anything else is an SSH destination. */
export async function openHost(destination: string, opts: SshOptions): Promise<Host> {
  return destination === 'local' ? new LocalHost(opts.sudo) : SshHost.connect(destination, opts);
}

/**
 * A host connected on first use, so the plan can be built (and --help, usage errors, a dry
 * run's listing) without a connection. A failed connection is remembered: every step that
 * needs the host fails at once with the same message instead of waiting out the timeout again.
 */
export class LazyHost implements Host {
  private opening?: Promise<Host>;
  constructor(
    readonly label: string,
    private readonly open: () => Promise<Host>,
  ) {}
  private host(): Promise<Host> {
    this.opening ??= this.open();
    return this.opening;
  }
  async run(argv: string[], opts?: RunOptions) {
    return (await this.host()).run(argv, opts);
  }
  async stream(argv: string[], into: Writable, opts?: RunOptions) {
    return (await this.host()).stream(argv, into, opts);
  }
  async close() {
    if (this.opening) await (await this.opening.catch(() => undefined))?.close();
  }
}

export function lazyHost(destination: string, opts: SshOptions): LazyHost {
  return new LazyHost(destination, () => openHost(destination, opts));
}
