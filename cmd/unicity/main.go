// Command unicity is the device agent: the systemd service that provisions this gateway
// through Azure DPS and keeps it connected to its IoT Hub, and the commands that factory
// lines and field technicians run. It is the only place that parses flags, chooses loggers
// and turns errors into the exit codes of the contract (see exit.go).
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/coreos/go-systemd/v22/journal"

	"github.com/unicity-iot/unicity/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	journald, _ := journal.StderrIsJournalStream()
	os.Exit(report(err, os.Stderr, journald))
}

// command is one verb of the CLI; groups (factory) carry sub-commands.
type command = cli.Command[*env]

// env is what a command may touch of the process: its streams. Commands take everything else
// from flags and the config file.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	// output is the command's --json flag, once it registered one (jsonFlag).
	output *jsonOutput
}

func commands() []command {
	return []command{
		{Name: "run", Summary: "the service: provision if needed, connect to the hub, stay connected", Run: runRun},
		{Name: "provision", Summary: "register with DPS unless provisioned; print the assignment", Run: runProvision},
		{Name: "reprovision", Summary: "register again; the old assignment stays until the new one is stored", Run: runReprovision},
		{Name: "status", Summary: "identity, assignment, service phase, last error, next retry", Run: runStatus},
		{Name: "check", Summary: "preflight checks: config, TPM, key, chain, clock, DNS/TCP/TLS to DPS and hub", Run: runCheck},
		{Name: "version", Summary: "print version, commit and Go version", Run: runVersion},
		{Name: "send", Summary: "send stdin as one telemetry message through the running service", Run: runSend},
		{Name: "identity", Summary: "show the certificate, registration ID, key location and key/cert match", Run: runIdentity},
		{Name: "factory", Summary: "factory line: create the TPM key, CSR, install and verify the identity", Sub: factoryCommands()},
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdin: os.Stdin, stdout: stdout, stderr: stderr}
	err := cli.Dispatch(ctx, e, stdout, stderr, "unicity", commands(), args)
	return e.output.finish(err)
}
