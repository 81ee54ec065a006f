// Command unicity-emulator serves an emulated Azure DPS and IoT Hub over MQTT 3.1.1 (TLS and
// WebSocket) for demos, CI and factory lines, and operates the running emulator: list
// devices and registrations, read telemetry and statistics, send cloud-to-device messages,
// invoke methods, patch twins, disable, delete and move devices, enroll more (with custom
// allocation), manage operational certificates. The services are dps/dpstest and
// hub/hubtest; this command owns the files in its directory (the state kept across restarts
// among them), where the services listen, the flags and the local admin socket.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/unicity-iot/unicity/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(report(err, os.Stderr))
}

type command = cli.Command[*env]

// env is what a command may touch of the process.
type env struct {
	stdout, stderr io.Writer
}

func commands() []command {
	return []command{
		{Name: "init", Summary: "write a server PKI and a factory CA enrolled as a group enrollment", Run: runInit},
		{Name: "serve", Summary: "serve DPS and IoT Hub; print one JSON line once listening", Run: runServe},
		{Name: "sign", Summary: "sign a device CSR with the factory CA", Run: runSign},
		{Name: "devices", Summary: "list the devices of every hub", Run: runDevices},
		{Name: "registrations", Summary: "list the register requests DPS received and what became of each", Run: runRegistrations},
		{Name: "telemetry", Summary: "print the telemetry received", Run: runTelemetry},
		{Name: "c2d", Summary: "send a cloud-to-device message", Run: runC2D},
		{Name: "invoke", Summary: "invoke a direct method and print the device's answer", Run: runInvoke},
		{Name: "twin", Summary: "print a device twin, or patch its desired properties", Run: runTwin},
		{Name: "disable", Summary: "disable (or re-enable) a device on its hub", Run: runDisable},
		{Name: "delete", Summary: "delete a device from its hub", Run: runDelete},
		{Name: "move", Summary: "move a device to another hub", Run: runMove},
		{Name: "enroll", Summary: "add a DPS enrollment", Run: runEnroll},
		{Name: "policy", Summary: "set or clear an enrollment's credential policy (DPS issues operational certificates)", Run: runPolicy},
		{Name: "revoke", Summary: "revoke a device's operational certificates on its hub", Run: runRevoke},
		{Name: "renewal-fault", Summary: "script the hubs' answers to certificate renewals", Run: runRenewalFault},
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdout: stdout, stderr: stderr}
	return cli.Dispatch(ctx, e, stdout, stderr, "unicity-emulator", commands(), args)
}

// newFlags returns a command's flag set with the --dir flag every command requires. Parse
// errors are reported by parse, not by the flag package, so that help goes to stdout and
// mistakes to stderr.
func newFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet("unicity-emulator "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	dir := fs.String("dir", "", "emulator `directory` (written by init)")
	return fs, dir
}

// parse parses args; --help prints the command's flags on stdout and ends it with success.
func parse(e *env, fs *flag.FlagSet, usage string, args []string) error {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		printUsage(e.stdout, fs, usage)
		return flag.ErrHelp
	}
	switch {
	case err != nil:
	case fs.NArg() > 0:
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case fs.Lookup("dir").Value.String() == "":
		err = errors.New("--dir is required")
	}
	if err != nil {
		printUsage(e.stderr, fs, usage)
		return usageErrorf("%s: %v", fs.Name(), err)
	}
	return nil
}

func printUsage(w io.Writer, fs *flag.FlagSet, usage string) {
	fmt.Fprintf(w, "Usage: %s %s\n\nFlags:\n", fs.Name(), usage)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func usageErrorf(format string, a ...any) error { return cli.Usagef(format, a...) }

// exitCode: 0 for success and --help, 2 for usage errors, 1 for everything else.
func exitCode(err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case cli.IsUsage(err):
		return 2
	}
	return 1
}

func report(err error, stderr io.Writer) int {
	code := exitCode(err)
	if code != 0 {
		fmt.Fprintf(stderr, "unicity-emulator: %v\n", err)
	}
	return code
}
