// Command unicity-bench runs the benchmark suite of package bench (`make bench`): the built
// agent against the emulator on loopback. It prints one table and writes the same figures as
// JSON to the path it names.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/unicity-iot/unicity/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "unicity-bench:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("unicity-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Bool("short", false, "the CI variant: fewer runs, a short idle, a small fleet; other flags still apply")
	// -short chooses the defaults of the other flags, so it is looked for before parsing.
	opts := bench.DefaultOptions()
	if slices.ContainsFunc(args, func(a string) bool {
		return strings.TrimLeft(a, "-") == "short" || strings.TrimLeft(a, "-") == "short=true"
	}) {
		opts = bench.ShortOptions()
	}
	fs.StringVar(&opts.Bin, "bin", opts.Bin, "`dir`ectory with unicity and unicity-emulator (make build)")
	fs.StringVar(&opts.Dist, "dist", opts.Dist, "`dir`ectory with make cross's binaries, for the sizes per architecture")
	fs.IntVar(&opts.Runs, "runs", opts.Runs, "measured boots of each kind")
	fs.DurationVar(&opts.Idle, "idle", opts.Idle, "how long the connected agent is watched idle")
	fs.IntVar(&opts.Fleet, "fleet", opts.Fleet, "devices in the fleet storm")
	fs.IntVar(&opts.Quota, "quota", opts.Quota, "DPS registrations per minute in the fleet storm")
	fs.IntVar(&opts.Messages, "messages", opts.Messages, "telemetry messages per measurement")
	fs.BoolVar(&opts.TPM, "tpm", opts.TPM, "measure with swtpm too")
	fs.StringVar(&opts.Work, "work", "", "keep keys, configurations and logs in `dir` (default: a temporary directory, removed)")
	out := fs.String("json", filepath.Join("bin", "bench.json"), "write the report as JSON to `file`")
	markdown := fs.String("markdown", "", "also write the figures as a Markdown table to `file` (for the README)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	opts.Log = stderr
	report, err := bench.Run(ctx, opts)
	if err != nil {
		return err
	}
	if err := report.WriteTable(stdout); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		return err
	}
	if err := report.WriteJSON(*out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "JSON: %s\n", *out)
	if *markdown != "" {
		f, err := os.Create(*markdown)
		if err != nil {
			return err
		}
		if err := errors.Join(report.WriteMarkdown(f), f.Close()); err != nil {
			return err
		}
	}
	if len(report.Failures) > 0 {
		return fmt.Errorf("%d scenarios failed", len(report.Failures))
	}
	return nil
}
