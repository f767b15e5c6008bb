/*
 * A Linux /init that never makes a system call: on hosts whose KVM cannot
 * take a guest system call (docs/host-kvm.md) the kernel stays up with this
 * as PID 1 instead of panicking. `pause` keeps the spin cheap for the host.
 */
void _start(void)
{
	for (;;)
		__asm__ volatile("pause");
}
