// Command unicity is the device agent: the systemd service that provisions this gateway
// through Azure DPS and keeps it connected to its IoT Hub, and the commands that factory
// lines and field technicians run. It is the only place that parses flags, chooses loggers
// and turns errors into the exit codes of the contract (see exit.go).
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(report(err, os.Stderr))
}

// command is one verb of the CLI. Groups (factory) carry sub-commands instead of a run func.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
	sub     []command
}

// env is what a command may touch of the process: its streams. Commands take everything else
// from flags and the config file.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
}

func commands() []command {
	return []command{
		{name: "run", summary: "the service: provision if needed, connect to the hub, stay connected", run: runRun},
		{name: "provision", summary: "register with DPS unless provisioned; print the assignment", run: runProvision},
		{name: "reprovision", summary: "register again; the old assignment stays until the new one is stored", run: runReprovision},
		{name: "status", summary: "identity, assignment, service phase, last error, next retry", run: runStatus},
		{name: "check", summary: "preflight checks: config, TPM, key, chain, clock, DNS/TCP/TLS to DPS and hub", run: runCheck},
		{name: "version", summary: "print version, commit and Go version", run: runVersion},
		{name: "send", summary: "send stdin as one telemetry message through the running service", run: runSend},
		{name: "identity", summary: "show the certificate, registration ID, key location and key/cert match", run: runIdentity},
		{name: "factory", summary: "factory line: create the TPM key, CSR, install and verify the identity", sub: factoryCommands()},
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdin: os.Stdin, stdout: stdout, stderr: stderr}
	return dispatch(ctx, e, "unicity", commands(), args)
}

func dispatch(ctx context.Context, e *env, path string, cmds []command, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(e.stdout, path, cmds)
		if len(args) == 0 {
			return usageErrorf("missing command")
		}
		return nil
	}
	for _, c := range cmds {
		if c.name != args[0] {
			continue
		}
		if c.sub != nil {
			return dispatch(ctx, e, path+" "+c.name, c.sub, args[1:])
		}
		return c.run(ctx, e, args[1:])
	}
	usage(e.stderr, path, cmds)
	return usageErrorf("unknown command %q", path+" "+args[0])
}

func usage(w io.Writer, path string, cmds []command) {
	fmt.Fprintf(w, "Usage: %s <command> [flags]\n\nCommands:\n", path)
	for _, c := range cmds {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nRun '%s <command> --help' for a command's flags.\n", path)
}
