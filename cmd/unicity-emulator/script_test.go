package main

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/unicity-iot/unicity/internal/poll"
)

// The scenarios in testdata/script run the real unicity-emulator main as a program, so they
// show what an operator types and sees.
//
// Custom commands:
//
//	waitsock PATH
//	    wait (up to 30 s) until PATH exists: the admin socket of a serve started with '&'.
//	device provision|connect|renew EMUDIR ID
//	    a device made of the agent's dps and hub packages (device_script_test.go); serve
//	    listens on $DPS_PORT and $HUB_PORT for it.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"unicity-emulator": main})
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:   "testdata/script",
		Setup: setupPorts,
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"waitsock": cmdWaitSock,
			"device":   cmdDevice,
		},
	})
}

func cmdWaitSock(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: waitsock PATH")
	}
	path := ts.MkAbs(args[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := poll.Until(ctx, 20*time.Millisecond, func() bool {
		_, err := os.Stat(path)
		return err == nil
	})
	if err != nil {
		ts.Fatalf("%s did not appear", path)
	}
}
