package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// With -pin the benchmark runs as if the primary and each replica had a
// machine of their own: the primary, the writer and the watchers on CPU
// 0; replicas, the joining node, the replica's reader (and LiteFS's
// replica) on CPU 1. Without it the kernel spreads every process over
// every CPU, and a replica's apply waits for CPUs the primary's commits
// hold, which separate machines would not share.
const (
	primaryCPU = 0
	replicaCPU = 1
)

// checkPin reports whether this machine can pin: two CPUs or more, and
// taskset(1) to start processes on one.
func checkPin() error {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return fmt.Errorf("-pin: %w", err)
	}
	if !set.IsSet(primaryCPU) || !set.IsSet(replicaCPU) {
		return fmt.Errorf("-pin needs CPUs %d and %d; this process may run on %d CPU(s)", primaryCPU, replicaCPU, set.Count())
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		return fmt.Errorf("-pin starts processes with taskset (util-linux): %w", err)
	}
	return nil
}

// pinProcess keeps every thread of this process on cpu. Threads started
// later are clones of these and inherit it.
func pinProcess(cpu int) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	var set unix.CPUSet
	set.Set(cpu)
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
			return fmt.Errorf("pin thread %d to CPU %d: %w", tid, cpu, err)
		}
	}
	return nil
}

// pinThread locks the calling goroutine to its thread and keeps that
// thread on cpu, until the returned function undoes both.
func pinThread(cpu int) (func(), error) {
	runtime.LockOSThread()
	var old, set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	set.Set(cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("pin a thread to CPU %d: %w", cpu, err)
	}
	return func() {
		_ = unix.SchedSetaffinity(0, &old)
		runtime.UnlockOSThread()
	}, nil
}

// pinnedCommand is exec.Command(name, args...), started on cpu if pin.
func pinnedCommand(pin bool, cpu int, name string, args ...string) *exec.Cmd {
	if !pin {
		return exec.Command(name, args...)
	}
	return exec.Command("taskset", append([]string{"-c", strconv.Itoa(cpu), name}, args...)...)
}
