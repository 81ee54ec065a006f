package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/unicity-iot/unicity/device"
	"github.com/unicity-iot/unicity/dps"
	"github.com/unicity-iot/unicity/localapi"
	"github.com/unicity-iot/unicity/storage"
)

// provisionTimeout bounds a registration run by hand: DPS retries temporary failures for as
// long as it is allowed to, and a technician wants an answer.
const provisionTimeout = 2 * time.Minute

func runProvision(ctx context.Context, e *env, args []string) error {
	return provisionCommand(ctx, e, "provision", args)
}

func runReprovision(ctx context.Context, e *env, args []string) error {
	return provisionCommand(ctx, e, "reprovision", args)
}

// provisionCommand is `provision` (register unless provisioned) and `reprovision [--force]`
// (register again; the old assignment stays in force until a new one is stored). Through
// the running service when it answers on the local API, otherwise by itself under the state
// lock.
func provisionCommand(ctx context.Context, e *env, name string, args []string) error {
	again := name == "reprovision"
	synopsis := "[--config FILE] [--json] [--timeout D]"
	if again {
		synopsis = "[--force] " + synopsis
	}
	fs := newFlagSet(e, name, synopsis)
	var tf tpmFlags
	tf.register(fs)
	out := e.jsonFlag(fs, "print the assignment as one JSON object (or the error, its kind and exit code)")
	timeout := fs.Duration("timeout", provisionTimeout, "give up a registration after `D`")
	var force *bool
	if again {
		force = fs.Bool("force", false, "register even if the last registration is more recent than [agent] reprovision_interval")
	} else {
		force = new(bool)
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := tf.loadConfig(fs, false)
	if err != nil {
		return err
	}
	if tf.tpm != "" {
		cfg.TPM.Device = tf.tpm
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	storeError := ""
	progress := func(s device.Status) {
		if s.Message != "" {
			fmt.Fprintf(e.stderr, "unicity: %s\n", s.Message)
		}
		if s.StoreError != "" && s.StoreError != storeError {
			fmt.Fprintf(e.stderr, "unicity: warning: %s\n", s.StoreError)
		}
		storeError = s.StoreError
	}
	asg, err := localapi.NewClient(cfg).Reprovision(ctx, *force, !again, progress)
	switch {
	case err == nil:
		return printAssignment(e.stdout, out, asg, "")
	case !errors.Is(err, localapi.ErrNotRunning):
		return err
	}

	prov, err := device.NewDPS(cfg)
	if err != nil {
		return configErrorf("%w", err)
	}
	prov.Progress = func(p dps.Progress) { fmt.Fprintf(e.stderr, "unicity: %s\n", p.Message) }
	reg := &device.StandaloneRegistration{Config: cfg, Store: storage.New(cfg.State.Dir), Provisioner: prov, Now: now}
	var st *storage.State
	fresh := true
	if again {
		st, err = reg.Reprovision(ctx, *force)
	} else {
		st, fresh, err = reg.Provision(ctx)
	}
	if err != nil {
		return err
	}
	note := ""
	if !fresh {
		note = "already provisioned"
	}
	a := localapi.AssignmentOf(st)
	return printAssignment(e.stdout, out, &a, note)
}

func printAssignment(w io.Writer, out *jsonOutput, a *localapi.Assignment, note string) error {
	if out.on {
		return out.print(a)
	}
	if note != "" {
		fmt.Fprintf(w, "%s\n", note)
	}
	fmt.Fprintf(w, "Registration ID: %s\n", a.RegistrationID)
	fmt.Fprintf(w, "Assigned hub:    %s\n", a.AssignedHub)
	fmt.Fprintf(w, "Device ID:       %s\n", a.DeviceID)
	fmt.Fprintf(w, "Substatus:       %s\n", a.Substatus)
	if a.Transport != "" {
		fmt.Fprintf(w, "Transport:       %s\n", a.Transport)
	}
	_, err := fmt.Fprintf(w, "Provisioned at:  %s\n", a.ProvisionedAt.UTC().Format(time.RFC3339))
	return err
}
